"""Test databases: one migrated template per session, one fresh copy per test.

The server comes from TEST_DATABASE_URL (set by `make test`: the local server on
127.0.0.1:5432 when it answers, otherwise the embedded one). Tests only create and drop
databases named kc_test_*; they never touch the pipeline's own database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.rows import DictRow, dict_row

from tests.redis_server import RedisServer
from workers.database import migrate
from workers.database.server import test_admin_url
from workers.settings import load_settings


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def admin_url() -> str:
    return os.environ.get("TEST_DATABASE_URL") or test_admin_url(load_settings())


def _create_database(admin: str, name: str, template: str | None = None) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        suffix = f' TEMPLATE "{template}"' if template else ""
        conn.execute(f'CREATE DATABASE "{name}"{suffix}')


def _drop_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def template_db(admin_url: str) -> Iterator[str]:
    name = f"kc_test_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _create_database(admin_url, name)
    try:
        migrate.upgrade(with_database(admin_url, name))
        yield name
    finally:
        _drop_database(admin_url, name)


@pytest.fixture
def db_url(admin_url: str, template_db: str) -> Iterator[str]:
    name = f"kc_test_{uuid.uuid4().hex[:12]}"
    _create_database(admin_url, name, template=template_db)
    try:
        url = with_database(admin_url, name)
        # A copy does not keep its template's database privileges: close it as migration
        # 0015 closed the template, so each test meets the database a deployment has.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT kc_limit_database_access()")
        yield url
    finally:
        _drop_database(admin_url, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[DictRow]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as connection:
        yield connection


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own, on a free port (stopped afterwards)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
