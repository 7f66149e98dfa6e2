"""Running stages in-process against a test database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from uuid import UUID

import psycopg
from psycopg.rows import DictRow

from workers.db import make_pool
from workers.runtime import HANDLERS, run_worker
from workers.settings import Settings
from workers.stages import Outcome, Stage, StageContext, run_stage


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
            return await run_stage(pool, stage, HANDLERS[stage], ref, StageContext(settings))
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
