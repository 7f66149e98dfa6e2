"""The layer order of CONVENTIONS.md, held: a module imports only from its own package and
the layers below it, and no modules import each other, directly or round a longer circle.
Imports inside functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

from workers.settings import REPO_ROOT

# Lowest first. A part may import from its own layer's packages only when they are the same
# package: stages and events sit side by side and know nothing of each other.
LAYERS: list[set[str]] = [
    {"workers.errors", "workers.settings"},
    {"workers.rules"},
    {"workers.database"},
    {"workers.stages", "workers.events"},
    {"workers.runtime"},
    {"workers.ops"},
    {"workers.console"},
    {"workers.cli"},
    {"workers.__main__"},
]


def part_of(module: str) -> str:
    """The part a module belongs to: its sub-package, or itself for a top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer_of(part: str) -> int:
    for index, layer in enumerate(LAYERS):
        if part in layer:
            return index
    raise AssertionError(f"{part} is in no layer: add it to LAYERS and to CONVENTIONS.md")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The project's modules a module imports (`from workers.x import y` names module
    `workers.x.y` when that is a module, else `workers.x`)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in known:
                    found.add(full)
                elif node.module in known:
                    found.add(node.module)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    paths = sorted((root / "workers").rglob("*.py"))
    names = {module_name(path, root): path for path in paths}
    known = set(names)
    return {
        name: project_imports(ast.parse(path.read_text(encoding="utf-8"), str(path)), known)
        - {name}
        for name, path in names.items()
    }


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        here = part_of(module)
        for target in sorted(targets):
            there = part_of(target)
            if there == here or there == "workers":
                continue
            if layer_of(there) >= layer_of(here):
                found.append(f"{module} imports {target} ({there} is not below {here})")
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_runs_from_a_lower_layer_to_a_higher_one() -> None:
    assert wrong_way(import_graph(REPO_ROOT)) == []


def test_no_modules_import_each_other() -> None:
    assert circles(import_graph(REPO_ROOT)) == []


def test_every_part_has_a_layer() -> None:
    for module in import_graph(REPO_ROOT):
        if part_of(module) != "workers":
            layer_of(part_of(module))


def test_conventions_lists_the_layers_in_this_order() -> None:
    text = (REPO_ROOT / "CONVENTIONS.md").read_text(encoding="utf-8")
    section = text.split("**Layers**", 1)[1].split("\n- **", 1)[0]
    order = [part for layer in LAYERS for part in sorted(layer) if part != "workers.__main__"]
    positions = [section.find(f"`{part.removeprefix('workers.')}") for part in order]
    assert -1 not in positions, f"CONVENTIONS.md's Layers item misses one of {order}"
    assert positions == sorted(positions), "CONVENTIONS.md lists the layers in another order"


def _scratch(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


def test_the_checks_see_a_wrong_way_import_and_a_circle(tmp_path: Path) -> None:
    """The checks themselves, on a scratch tree: a stage that imports the runtime (lazily,
    inside a function), and two console modules that import each other."""
    root = _scratch(
        tmp_path,
        {
            "workers/__init__.py": "",
            "workers/stages/__init__.py": "",
            "workers/stages/a.py": "def f():\n    from workers.runtime.worker import x\n",
            "workers/runtime/__init__.py": "",
            "workers/runtime/worker.py": "from workers.stages import a\nx = 1\n",
            "workers/console/__init__.py": "",
            "workers/console/p.py": "from workers.console.q import y\nz = 1\n",
            "workers/console/q.py": "from workers.console import p\ny = 2\n",
        },
    )
    graph = import_graph(root)
    assert wrong_way(graph) == [
        "workers.stages.a imports workers.runtime.worker "
        "(workers.runtime is not below workers.stages)"
    ]
    assert circles(graph) == [
        ["workers.console.p", "workers.console.q"],
        ["workers.runtime.worker", "workers.stages.a"],
    ]
