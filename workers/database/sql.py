"""Named SQL: every query lives in `sql/queries/*.sql` under a `-- name: <name>` header.

Queries use psycopg's named placeholders with an explicit cast on each one
(`%(payment_id)s::uuid`), so the test suite can PREPARE every query against the migrated
database and a column that does not exist fails there, not in production.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import LiteralString

from workers.settings import REPO_ROOT

SQL_DIR = REPO_ROOT / "sql"
QUERIES_DIR = SQL_DIR / "queries"

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$")
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True)
class NamedQuery:
    name: str
    text: str
    source: Path

    def parameter_names(self) -> list[str]:
        """Named parameters in the order `positional()` numbers them."""
        return list(dict.fromkeys(_PLACEHOLDER.findall(self.text)))

    def positional(self) -> str:
        """The query with `$1, $2 ...` in place of named placeholders (for PREPARE)."""
        order: dict[str, int] = {}

        def number(match: re.Match[str]) -> str:
            return f"${order.setdefault(match.group(1), len(order) + 1)}"

        return _PLACEHOLDER.sub(number, self.text)


def parse_queries(path: Path) -> list[NamedQuery]:
    queries: list[NamedQuery] = []
    name: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if name is not None:
            text = "\n".join(lines).strip().rstrip(";").strip()
            if not text or all(line.lstrip().startswith("--") for line in text.splitlines()):
                raise ValueError(f"{path}: query {name!r} is empty")
            queries.append(NamedQuery(name, text, path))

    for line in path.read_text(encoding="utf-8").splitlines():
        if match := _NAME.match(line):
            flush()
            name, lines = match.group(1), []
        elif name is not None:
            lines.append(line)
    flush()
    return queries


@functools.cache
def all_queries() -> dict[str, NamedQuery]:
    found: dict[str, NamedQuery] = {}
    for path in sorted(QUERIES_DIR.glob("*.sql")):
        for query in parse_queries(path):
            if query.name in found:
                raise ValueError(
                    f"query {query.name!r} is defined in {found[query.name].source} and {path}"
                )
            found[query.name] = query
    return found


def q(name: str) -> LiteralString:
    """The text of the named query; KeyError names the missing query."""
    try:
        # The text comes from the repository's own files, never from input.
        text: LiteralString = all_queries()[name].text
        return text
    except KeyError:
        raise KeyError(f"no query named {name!r} in {QUERIES_DIR}") from None
