"""A normalised, readable dump of the schema the migrations produce (sql/schema.sql).

Built from the catalogs (not pg_dump), so it reads the same from any client version. The
test suite migrates a fresh database and compares: a migration that drifts from the checked-in
schema fails CI until `make schema` is run and the diff is reviewed.
"""

from __future__ import annotations

import re

import psycopg

SCHEMA_FILE_HEADER = (
    "-- The whole schema as the migrations leave it: regenerate with `make schema`.\n"
    "-- Read-only reference; change the schema with a new migration in sql/migrations/.\n"
)

_SECTIONS: list[tuple[str, str]] = [
    (
        "EXTENSIONS",
        """
        SELECT 'EXTENSION ' || e.extname || ' SCHEMA ' || n.nspname || ';'
        FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
        WHERE e.extname <> 'plpgsql'
        ORDER BY e.extname""",
    ),
    (
        "TYPES",
        """
        SELECT 'TYPE ' || t.typname || ' AS ENUM (' ||
               string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder) || ');'
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public'
        GROUP BY t.typname ORDER BY t.typname""",
    ),
    (
        "TABLES",
        """
        SELECT 'TABLE ' || c.relname || E' (\\n' || string_agg(
                 '    ' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                 || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
                 || CASE WHEN a.attgenerated = 's'
                         THEN ' GENERATED ALWAYS AS (' || pg_get_expr(d.adbin, d.adrelid)
                              || ') STORED'
                         WHEN a.attidentity <> '' THEN ' IDENTITY'
                         WHEN d.adbin IS NOT NULL
                         THEN ' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid) ELSE '' END,
                 E',\\n' ORDER BY a.attnum) || E'\\n);'
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE n.nspname = 'public' AND c.relkind = 'r'
        GROUP BY c.relname ORDER BY c.relname""",
    ),
    (
        "CONSTRAINTS",
        """
        SELECT 'CONSTRAINT ' || c.relname || '.' || co.conname || ' '
               || pg_get_constraintdef(co.oid) || ';'
        FROM pg_constraint co
        JOIN pg_class c ON c.oid = co.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        -- PostgreSQL 18 also lists NOT NULL here (contype 'n'); TABLES shows those.
        WHERE n.nspname = 'public' AND co.contype <> 'n'
        ORDER BY c.relname, co.conname""",
    ),
    (
        "INDEXES",
        """
        SELECT pg_get_indexdef(i.indexrelid) || ';'
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public'
        ORDER BY c.relname""",
    ),
    (
        "VIEWS",
        """
        SELECT 'VIEW ' || c.relname || E' AS\\n' || pg_get_viewdef(c.oid, true)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('v', 'm')
        ORDER BY c.relname""",
    ),
    (
        "FUNCTIONS",
        """
        SELECT pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
          -- an extension's own functions are its business (and differ between its versions)
          AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                          AND d.objid = p.oid AND d.deptype = 'e')
        ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)""",
    ),
    (
        "TRIGGERS",
        """
        SELECT pg_get_triggerdef(t.oid) || ';'
        FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND NOT t.tgisinternal
        ORDER BY c.relname, t.tgname""",
    ),
]


def dump_schema(url: str) -> str:
    parts = [SCHEMA_FILE_HEADER]
    with psycopg.connect(url) as conn:
        for title, query in _SECTIONS:
            rows = conn.execute(query).fetchall()
            parts.append(f"\n-- {title}\n")
            parts.extend(str(row[0]).rstrip() + "\n" for row in rows)
    return "\n".join(part.rstrip("\n") for part in parts) + "\n"


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
