"""A normalised, readable dump of the schema the migrations produce (sql/schema.sql).

Built from the catalogs (not pg_dump), so it reads the same from any client version. Each
object is written once, as the migrations leave it, with its comment (`COMMENT ON`, written by
the migrations) above it: a table with its columns (each column's comment above it), then its
constraints, indexes and triggers; a view; a function. Objects come in a stable order (by kind,
then name), so the file reads as the current schema and a diff shows what a migration changed.
The test suite migrates a fresh database and compares: a migration that drifts from the
checked-in schema fails CI until `make schema` is run and the diff is reviewed.
"""

from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from typing import Any

import psycopg

SCHEMA_FILE_HEADER = (
    "-- The whole schema as the migrations leave it: regenerate with `make schema`.\n"
    "-- Read-only reference; change the schema with a new migration in sql/migrations/.\n"
    "-- Each object's comment (COMMENT ON, from the migrations) is written above it, and a\n"
    "-- table is followed by its constraints, indexes and triggers. pgqueuer's own objects\n"
    "-- carry no comment: they are its business (sql/pgqueuer/).\n"
)

_EXTENSIONS = """
    SELECT 'EXTENSION ' || e.extname || ' SCHEMA ' || n.nspname || ';'
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname <> 'plpgsql'
    ORDER BY e.extname"""

_TYPES = """
    SELECT obj_description(t.oid, 'pg_type'),
           'TYPE ' || t.typname || ' AS ENUM (' ||
           string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder) || ');'
    FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
    JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = 'public'
    GROUP BY t.oid, t.typname ORDER BY t.typname"""

_TABLES = """
    SELECT c.relname, obj_description(c.oid, 'pg_class')
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' AND c.relkind = 'r'
    ORDER BY c.relname"""

_COLUMNS = """
    SELECT c.relname, col_description(c.oid, a.attnum),
           a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
           || CASE WHEN a.attgenerated = 's'
                   THEN ' GENERATED ALWAYS AS (' || pg_get_expr(d.adbin, d.adrelid) || ') STORED'
                   WHEN a.attidentity <> '' THEN ' IDENTITY'
                   WHEN d.adbin IS NOT NULL
                   THEN ' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid) ELSE '' END
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
    WHERE n.nspname = 'public' AND c.relkind = 'r'
    ORDER BY c.relname, a.attnum"""

# What belongs to a table, after it: its constraints, indexes and triggers, each by name.
_TABLE_PARTS = """
    SELECT c.relname, 1, co.conname, NULL,
           'CONSTRAINT ' || c.relname || '.' || co.conname || ' '
           || pg_get_constraintdef(co.oid) || ';'
    FROM pg_constraint co
    JOIN pg_class c ON c.oid = co.conrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    -- PostgreSQL 18 also lists NOT NULL here (contype 'n'); the columns show those.
    WHERE n.nspname = 'public' AND co.contype <> 'n'
    UNION ALL
    SELECT t.relname, 2, c.relname, NULL, pg_get_indexdef(i.indexrelid) || ';'
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_class t ON t.oid = i.indrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public'
    UNION ALL
    SELECT c.relname, 3, t.tgname, obj_description(t.oid, 'pg_trigger'),
           pg_get_triggerdef(t.oid) || ';'
    FROM pg_trigger t
    JOIN pg_class c ON c.oid = t.tgrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' AND NOT t.tgisinternal
    ORDER BY 1, 2, 3"""

_VIEWS = """
    SELECT obj_description(c.oid, 'pg_class'),
           'VIEW ' || c.relname || E' AS\\n' || pg_get_viewdef(c.oid, true)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' AND c.relkind IN ('v', 'm')
    ORDER BY c.relname"""

_FUNCTIONS = """
    SELECT obj_description(p.oid, 'pg_proc'), pg_get_functiondef(p.oid)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'public'
      -- an extension's own functions are its business (and differ between its versions)
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                      AND d.objid = p.oid AND d.deptype = 'e')
    ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)"""


def commented(comment: str | None, text: str, indent: str = "") -> str:
    """`text` with `comment` above it as `-- ` lines, wrapped at 96 columns."""
    if not comment:
        return text
    width = 96 - len(indent) - 3
    lines = [
        line
        for paragraph in comment.splitlines()
        for line in (textwrap.wrap(paragraph, width, break_long_words=False) or [""])
    ]
    return "".join(f"{indent}-- {line}".rstrip() + "\n" for line in lines) + text


def _rows(conn: psycopg.Connection[Any], query: str) -> list[tuple[Any, ...]]:
    return conn.execute(query).fetchall()


def _tables(conn: psycopg.Connection[Any]) -> list[str]:
    columns: dict[str, list[str]] = defaultdict(list)
    for table, comment, column in _rows(conn, _COLUMNS):
        columns[table].append(commented(comment, f"    {column}", indent="    "))
    parts: dict[str, list[str]] = defaultdict(list)
    for table, _kind, _name, comment, text in _rows(conn, _TABLE_PARTS):
        parts[table].append(commented(comment, text))
    out = []
    for table, comment in _rows(conn, _TABLES):
        body = f"TABLE {table} (\n" + ",\n".join(columns[table]) + "\n);"
        out.append("\n".join([commented(comment, body), *parts[table]]))
    return out


def dump_schema(url: str) -> str:
    with psycopg.connect(url) as conn:
        sections = [
            ("EXTENSIONS", [str(row[0]) for row in _rows(conn, _EXTENSIONS)]),
            ("TYPES", [commented(c, str(t)) for c, t in _rows(conn, _TYPES)]),
            ("TABLES, each with its constraints, indexes and triggers", _tables(conn)),
            ("VIEWS", [commented(c, str(v)) for c, v in _rows(conn, _VIEWS)]),
            ("FUNCTIONS", [commented(c, str(f)) for c, f in _rows(conn, _FUNCTIONS)]),
        ]
    text = SCHEMA_FILE_HEADER
    for title, items in sections:
        # A blank line between objects of more than one line.
        gap = "\n\n" if any("\n" in item.strip() for item in items) else "\n"
        text += f"\n-- {title}\n" + gap.join(item.strip("\n") for item in items) + "\n"
    return text


# Inside a view, a column's table prefix: PostgreSQL 16+ prints a one-table view's columns
# without it, 15 with it (`stage_history.stage` / `stage`).
_VIEW_QUALIFIER = re.compile(r"\b[a-z_][a-z0-9_]*\.(?=[a-z_\"])")


def comparable(schema: str) -> str:
    """The dump with what differs only by the server's major version taken out: the suite
    runs on PostgreSQL 15 and on the embedded 18, and sql/schema.sql comes from either."""
    head, views, tail = _section(schema, "-- VIEWS\n", "\n-- FUNCTIONS\n")
    return head + _VIEW_QUALIFIER.sub("", views) + tail


def _section(text: str, start: str, end: str) -> tuple[str, str, str]:
    first = text.index(start)
    last = text.index(end, first)
    return text[:first], text[first:last], text[last:]
