"""CONVENTIONS.md, checked where a test can: the pure rules do no I/O, and psycopg connections
are opened only where the convention says."""

from __future__ import annotations

import ast

from workers.settings import REPO_ROOT

PURE = {"metadata.py", "schedule.py", "matching.py", "shapes.py"}
# Packages a pure rule may not import: a database, the queue, the project's SQL, processes.
IMPURE = {
    "psycopg",
    "psycopg_pool",
    "pgqueuer",
    "workers.database.connections",
    "workers.database.sql",
    "subprocess",
}
# connections.py and driver.py, and the tools that need their own kind of connection.
OPENS_CONNECTIONS = {
    "connections.py",
    "driver.py",
    "migrate.py",
    "schema_dump.py",
    "server.py",
    "embedded.py",  # creates the pipeline's database on its server
    "worker.py",  # pgqueuer's own driver, kept for comparison
}


def modules() -> dict[str, ast.Module]:
    paths = sorted((REPO_ROOT / "workers").rglob("*.py"))
    return {path.name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in paths}


def imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def opens_a_connection(tree: ast.Module) -> bool:
    """Calls psycopg.connect(...) or psycopg.AsyncConnection.connect(...)."""
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "connect"
        and "psycopg" in ast.unparse(node.func.value)
        for node in ast.walk(tree)
    )


def test_the_pure_rules_import_no_io() -> None:
    trees = modules()
    for name in sorted(PURE):
        reached = {
            module
            for module in imported(trees[name])
            if any(module == bad or module.startswith(bad + ".") for bad in IMPURE)
        }
        assert reached == set(), f"{name} imports {reached}"


def test_connections_are_opened_where_the_convention_says() -> None:
    opening = {name for name, tree in modules().items() if opens_a_connection(tree)}
    assert opening <= OPENS_CONNECTIONS, f"also opened in {opening - OPENS_CONNECTIONS}"
    assert {"connections.py", "driver.py"} <= opening


def test_the_check_sees_a_connection_being_opened() -> None:
    assert opens_a_connection(ast.parse("import psycopg\npsycopg.connect(url)\n"))
    assert opens_a_connection(ast.parse("await psycopg.AsyncConnection.connect(url)\n"))
    assert not opens_a_connection(ast.parse("conn.execute('SELECT 1')\n"))
