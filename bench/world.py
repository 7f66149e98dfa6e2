"""Benchmark databases: created fresh, migrated, seeded set-based from bench/world.sql."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from workers.database import migrate

WORLD_SQL = Path(__file__).with_name("world.sql")


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@contextmanager
def fresh_database(admin_url: str, keep: bool = False) -> Iterator[str]:
    name = f"kc_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin_url, name)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        if not keep:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(url: str, *, trainers: int, students: int, booked_allocations: int) -> float:
    """Seed the world; returns seconds taken. Triggers are off while seeding (replica role)."""
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(f"SET kc.trainers = {int(trainers)}")
        conn.execute(f"SET kc.students = {int(students)}")
        conn.execute(f"SET kc.booked_allocations = {int(booked_allocations)}")
        conn.execute(WORLD_SQL.read_text(encoding="utf-8"))
    return time.perf_counter() - started
