"""Acceptance: a real worker process, started as `python -m workers run`, signalled to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import DictRow

from tests import factories as f

Conn = psycopg.Connection[DictRow]


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def worker(db_url: str, conn: Conn) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "DATABASE_URL": db_url, "KC_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers", "run", "--no-migrate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def listening() -> bool:
        row = conn.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = "
            "current_database() AND query ILIKE 'LISTEN%%'"
        ).fetchone()
        return row is not None and row["n"] > 0

    try:
        wait_for(listening, 30, "the worker to LISTEN")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_worker_process_turns_a_payment_into_sessions_and_stops_on_sigterm(
    conn: Conn, worker: subprocess.Popen[str]
) -> None:
    course = f.course(conn)
    student = f.student(conn)
    trainer = f.trainer(conn)
    f.payment(conn, student, course, {"sessionCount": 10, "timeSlot": "4:00 PM"})

    def scheduled() -> bool:
        row = conn.execute(
            "SELECT count(*) AS n FROM tutoring_sessions WHERE trainer_id = %s", (trainer,)
        ).fetchone()
        return row is not None and row["n"] == 10

    wait_for(scheduled, 30, "10 sessions")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    output = worker.stdout.read() if worker.stdout else ""
    assert "sessions" in output and "10 of 10 sessions written" in output
