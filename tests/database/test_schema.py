"""The schema is what the repository says it is: migrations, schema.sql, named queries, enums."""

from __future__ import annotations

import re

import psycopg
import pytest
from pgqueuer.adapters.persistence.qb import QueryBuilderEnvironment
from psycopg.rows import DictRow

from workers.database.schema_dump import comparable, dump_schema
from workers.database.sql import SQL_DIR, all_queries
from workers.rules.matching import Reason
from workers.rules.metadata import RejectReason
from workers.rules.schedule import ScheduleMode
from workers.stages.contract import Stage

Conn = psycopg.Connection[DictRow]


def test_migrations_produce_the_checked_in_schema(db_url: str) -> None:
    expected = (SQL_DIR / "schema.sql").read_text(encoding="utf-8")
    actual = dump_schema(db_url)
    assert comparable(actual) == comparable(expected), (
        "the migrated schema differs from sql/schema.sql: run `make schema` and review the diff"
    )


def test_pgqueuer_schema_file_matches_the_pinned_version() -> None:
    from importlib.metadata import version

    pinned = version("pgqueuer")
    rendered = QueryBuilderEnvironment().build_install_query()
    path = SQL_DIR / "pgqueuer" / f"pgqueuer-{pinned}.sql"
    assert path.exists(), f"pgqueuer {pinned} has no schema file; generate it"
    assert path.read_text(encoding="utf-8").strip() == rendered.strip()


@pytest.mark.parametrize("name", sorted(all_queries()))
def test_named_query_prepares(conn: Conn, name: str) -> None:
    query = all_queries()[name]
    conn.execute(f"PREPARE checked AS {query.positional()}")
    conn.execute("DEALLOCATE checked")


def test_every_placeholder_has_a_cast() -> None:
    for query in all_queries().values():
        bare = re.findall(r"%\(\w+\)s(?!::)", query.text)
        assert not bare, f"{query.name}: cast every parameter ({bare})"


def _check_values(conn: Conn, table: str, column: str) -> set[str]:
    rows = conn.execute(
        "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype = 'c'",
        (table,),
    ).fetchall()
    for row in rows:
        if re.search(rf"\b{column}\b", row["def"]) and "ANY" in row["def"]:
            return set(re.findall(r"'([a-z_]+)'::text", row["def"]))
    raise AssertionError(f"no CHECK lists the values of {table}.{column}")


def test_python_and_sql_enums_agree(conn: Conn) -> None:
    assert _check_values(conn, "stage_history", "stage") == {s.value for s in Stage}
    assert _check_values(conn, "trainer_allocations", "reason") == {r.value for r in Reason}
    assert _check_values(conn, "student_course_purchases", "schedule_mode") == {
        m.value for m in ScheduleMode
    }


def test_reject_reasons_are_short_codes() -> None:
    assert all(re.fullmatch(r"[a-z_]+", r.value) for r in RejectReason)


def test_entrypoints_match_stages(conn: Conn) -> None:
    body = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'enqueue_stage'").fetchone()
    assert body is not None
    listed = set(re.findall(r"'(\w+)'", body["prosrc"].split("THEN")[0]))
    assert listed == {s.value for s in Stage}


def _pgqueuer_objects() -> set[str]:
    """The names pgqueuer's own install script creates (its business, never commented here)."""
    (script,) = (SQL_DIR / "pgqueuer").glob("pgqueuer-*.sql")
    return set(
        re.findall(
            r"CREATE (?:UNLOGGED )?(?:TABLE|TYPE|FUNCTION|TRIGGER)\s+(?:IF NOT EXISTS\s+)?(\w+)",
            script.read_text(encoding="utf-8"),
            flags=re.IGNORECASE,
        )
    )


def test_every_project_object_has_a_comment(conn: Conn) -> None:
    """sql/schema.sql shows each object with its comment: a table, view, function, trigger or
    type of the project added without `COMMENT ON` (in its migration) fails here, named."""
    rows = conn.execute(
        """SELECT 'table ' || c.relname AS object, c.relname AS name
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
             AND obj_description(c.oid, 'pg_class') IS NULL
           UNION ALL
           SELECT 'view ' || c.relname, c.relname
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'public' AND c.relkind IN ('v', 'm')
             AND obj_description(c.oid, 'pg_class') IS NULL
           UNION ALL
           SELECT 'function ' || p.oid::regprocedure::text, p.proname
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = 'public' AND obj_description(p.oid, 'pg_proc') IS NULL
             AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                             AND d.objid = p.oid AND d.deptype = 'e')
           UNION ALL
           SELECT 'trigger ' || t.tgname || ' on ' || c.relname, t.tgname
           FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'public' AND NOT t.tgisinternal
             AND obj_description(t.oid, 'pg_trigger') IS NULL
           UNION ALL
           SELECT 'type ' || t.typname, t.typname
           FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
           WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'r')
             AND obj_description(t.oid, 'pg_type') IS NULL
           ORDER BY 1"""
    ).fetchall()
    theirs = _pgqueuer_objects() | {"alembic_version"}
    assert len(theirs) >= 7, "pgqueuer's install script no longer reads as expected"
    missing = [row["object"] for row in rows if row["name"] not in theirs]
    assert not missing, (
        "give each a COMMENT ON in its migration (what it is for, which rule it holds): "
        + ", ".join(missing)
    )
