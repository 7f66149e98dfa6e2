"""Running stages in-process against a test database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from uuid import UUID

import psycopg
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool

from workers.database.connections import AsyncConn, make_pool
from workers.runtime.registration import STAGES
from workers.runtime.runner import run_stage
from workers.runtime.worker import run_worker
from workers.settings import Settings
from workers.stages.contract import Outcome, Stage, StageContext

T = TypeVar("T")


def worker_settings(db_url: str) -> Settings:
    return Settings(DATABASE_URL=db_url, KC_POOL_SIZE=4, KC_IDLE_POLL_SECONDS=0.1)  # type: ignore[call-arg]


def drain(db_url: str) -> None:
    """Run a real pgqueuer worker until the queue is empty (every stage it triggers too)."""
    asyncio.run(asyncio.wait_for(run_worker(db_url, worker_settings(db_url), drain=True), 60))


def run_one(db_url: str, stage: Stage, ref: UUID) -> Outcome:
    """Run one stage for one row, outside the queue (as a replay or a duplicate job would)."""

    async def go() -> Outcome:
        settings = worker_settings(db_url)
        pool = make_pool(db_url, 2)
        await pool.open(wait=True)
        try:
            return await run_stage(pool, stage, STAGES[stage].handle, ref, StageContext(settings))
        finally:
            await pool.close()

    return asyncio.run(go())


def run_periodic(
    db_url: str, job: Callable[[AsyncConnectionPool[AsyncConn], Settings], Awaitable[T]]
) -> T:
    """Run one periodic job's body (what the worker's cron calls) once."""

    async def go() -> T:
        pool = make_pool(db_url, 2)
        await pool.open(wait=True)
        try:
            return await job(pool, worker_settings(db_url))
        finally:
            await pool.close()

    return asyncio.run(go())


def one(conn: psycopg.Connection[DictRow], sql: str, *params: object) -> DictRow:
    """The single row a query must return."""
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row


def allocation_of(conn: psycopg.Connection[DictRow], student: UUID) -> DictRow:
    """The student's live (pending or approved) allocation."""
    return one(
        conn,
        "SELECT * FROM trainer_allocations WHERE student_id = %s "
        "AND status IN ('pending', 'approved')",
        student,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def spawn_worker(db_url: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """A real worker process (`python -m workers run --single`), its output appended to `log`.
    Short heartbeats and many attempts suit tests that kill workers."""
    settings = {
        "DATABASE_URL": db_url,
        "KC_LOG_LEVEL": "WARNING",
        "KC_HEARTBEAT_SECONDS": "2",
        "KC_MAX_ATTEMPTS": "100",
        "KC_IDLE_POLL_SECONDS": "0.5",
        "KC_POOL_SIZE": "4",
    }
    with open(log, "ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "workers", "run", "--single", "--no-migrate"],
            env={**os.environ, **settings, **env},
            stdout=sink,
            stderr=sink,
        )


def move_into_past(
    conn: psycopg.Connection[DictRow], days: int, where: str = "true", *params: object
) -> int:
    """Time passes: the sessions matching `where` (dates and instants) move `days` earlier,
    as if that many days went by. Two steps, so the no-overlap constraint never compares a
    moved session with one not moved yet; triggers are off, since time passing fires none."""
    far = 100 * 366
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        moved = conn.execute(
            "UPDATE tutoring_sessions SET scheduled_date = scheduled_date - %s, "
            "starts_at = starts_at - make_interval(days => %s), "
            f"ends_at = ends_at - make_interval(days => %s) WHERE {where}",
            (far, far, far, *params),
        ).rowcount
        back = far - days
        conn.execute(
            "UPDATE tutoring_sessions SET scheduled_date = scheduled_date + %s, "
            "starts_at = starts_at + make_interval(days => %s), "
            "ends_at = ends_at + make_interval(days => %s) "
            "WHERE starts_at < now() - make_interval(days => %s)",
            (back, back, back, far - 2 * 366),
        )
    return moved


def full_trainer(
    conn: psycopg.Connection[DictRow], db_url: str, metadata: dict[str, object]
) -> tuple[UUID, UUID, list[UUID]]:
    """A course and a trainer of capacity 4 holding four students, a fifth waiting
    (at_capacity): (course, trainer, the five students)."""
    from tests import factories as f

    course = f.course(conn)
    trainer = f.trainer(conn, rating=None, slot=("06:00", "23:00"))
    students = [f.student(conn, name=f"s{i}") for i in range(5)]
    for hour, student in zip(range(8, 13), students, strict=True):
        f.payment(conn, student, course, {**metadata, "timeSlot": f"{hour}:00"})
        drain(db_url)  # one after the other: the fifth is the one who waits
    return course, trainer, students
