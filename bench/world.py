"""Benchmark databases: created fresh, migrated, seeded set-based from bench/world.sql; each
pipeline phase then gets a district of its own (bench/district.sql)."""

from __future__ import annotations

import math
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from workers.database import migrate

WORLD_SQL = Path(__file__).with_name("world.sql")
DISTRICT_SQL = Path(__file__).with_name("district.sql")

# A district's size: one trainer for this many of its payments (capacity by rating is 5 to 8,
# but a trainer's slots, modes and the neighbour rule leave fewer places; measured: see
# docs/benchmark.md), never fewer than MIN_TRAINERS (every course has teachers), at the
# fixed world's density (1,000 trainers in ~900 km2).
PAYMENTS_PER_TRAINER = 4
MIN_TRAINERS = 50
TRAINERS_PER_KM2 = 1.1


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


@dataclass(frozen=True)
class District:
    phase: str
    payments: int
    trainers: int
    side_km: float
    seconds: float  # seeding and VACUUM ANALYZE


def district_trainers(payments: int) -> int:
    return max(MIN_TRAINERS, math.ceil(payments / PAYMENTS_PER_TRAINER))


def add_district(url: str, phase: str, payments: int) -> District:
    """New trainers and students for one phase, and its orders in bench.orders (one payment
    per new student), then VACUUM ANALYZE: a phase starts with fresh statistics and no dead
    rows of earlier phases (the machine's server may run without autovacuum). Triggers are
    off while seeding (replica role), so no pending allocation elsewhere is retried."""
    started = time.perf_counter()
    trainers = district_trainers(payments)
    side_km = math.sqrt(trainers / TRAINERS_PER_KM2)
    settings = {
        "kc.phase": phase,
        "kc.payments": str(payments),
        "kc.trainers": str(trainers),
        "kc.side_km": str(side_km),
        "kc.seed": str(zlib.crc32(phase.encode()) / 2**32),
    }
    with psycopg.connect(url) as conn:
        conn.execute("SET LOCAL session_replication_role = replica")
        for name, value in settings.items():
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        conn.execute(DISTRICT_SQL.read_text(encoding="utf-8"))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return District(phase, payments, trainers, round(side_km, 1), time.perf_counter() - started)
