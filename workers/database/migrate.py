"""Schema migrations: alembic, run from Python with the URL from the environment.

Each revision executes a SQL file from `sql/` so the schema is written and reviewed as SQL.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import sqlalchemy.exc
from alembic.config import Config
from alembic.script import ScriptDirectory
from psycopg.rows import tuple_row

from alembic import command
from workers.database.sql import SQL_DIR
from workers.errors import ConfigurationError
from workers.settings import REPO_ROOT

log = logging.getLogger(__name__)


def alembic_config(database_url: str) -> Config:
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "alembic"))
    config.attributes["database_url"] = database_url
    return config


def sqlalchemy_url(database_url: str) -> str:
    """SQLAlchemy wants its driver named in the scheme; libpq URLs do not name one."""
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    return database_url


def upgrade(database_url: str, revision: str = "head") -> None:
    log.info("migrating database to %s", revision)
    try:
        command.upgrade(alembic_config(database_url), revision)
    except sqlalchemy.exc.OperationalError as exc:
        reason = str(exc.orig).strip() if exc.orig is not None else str(exc)
        raise ConfigurationError(f"cannot migrate: {reason}") from None


def head_revision() -> str | None:
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    return script.get_current_head()


def current_revision(conn: psycopg.Connection[Any]) -> str | None:
    """The revision recorded in the database (None before the first migration)."""
    cursor = conn.cursor(row_factory=tuple_row)
    row = cursor.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    version = cursor.execute("SELECT version_num FROM alembic_version").fetchone()
    return str(version[0]) if version else None


def run_sql_file(bind: Any, relative_path: str) -> None:
    """Execute one SQL file from `sql/` as-is (several statements, no parameters).

    The raw psycopg cursor is used so that neither SQLAlchemy nor psycopg interpret
    colons or percent signs inside the SQL.
    """
    text = (SQL_DIR / relative_path).read_text(encoding="utf-8")
    dbapi_connection = bind.connection.dbapi_connection
    with dbapi_connection.cursor() as cursor:
        # Decided per migration: a fresh database becomes kc_owner's at 0005, mid-run.
        cursor.execute((SQL_DIR / "migrations" / "before_each.sql").read_text(encoding="utf-8"))
        cursor.execute(text)
