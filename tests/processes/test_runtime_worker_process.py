"""Acceptance: a real worker process, started as `python -m workers run`, signalled to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import wait_for

Conn = psycopg.Connection[DictRow]


@pytest.fixture
def worker(db_url: str, conn: Conn) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "DATABASE_URL": db_url, "KC_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers", "run", "--single", "--no-migrate"],
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
    assert "sessions" in output and "10 sessions written: numbers 1..10 of 10" in output


def test_assign_cli_reassigns_through_the_running_worker(
    conn: Conn, worker: subprocess.Popen[str], db_url: str
) -> None:
    course = f.course(conn)
    student = f.student(conn)
    first = f.trainer(conn, name="First", rating=4.9)
    second = f.trainer(conn, name="Second", rating=3.0)
    f.payment(conn, student, course, {"sessionCount": 10, "timeSlot": "4:00 PM"})

    def allocated() -> bool:
        row = conn.execute(
            "SELECT trainer_id FROM trainer_allocations WHERE status = 'approved'"
        ).fetchone()
        return row is not None and row["trainer_id"] == first

    wait_for(allocated, 30, "the first allocation")
    purchase = conn.execute("SELECT id FROM student_course_purchases").fetchone()
    assert purchase is not None
    env = {**os.environ, "DATABASE_URL": db_url}
    cli = [sys.executable, "-m", "workers", "assign", str(purchase["id"])]
    done = subprocess.run(
        [*cli, str(second)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert " done: allocation " in done.stdout
    far = f.trainer(conn, name="Far", lat=f.HOME[0] + 1, radius_km=5)
    refused = subprocess.run(
        [*cli, str(far)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 1
    assert "refused: out_of_range" in refused.stdout
    no_note = subprocess.run(
        [*cli, str(far), "--override"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert no_note.returncode == 1
    assert "needs a note" in no_note.stderr
    schedules = conn.execute("SELECT entrypoint FROM pgqueuer_schedules").fetchall()
    assert sorted(s["entrypoint"] for s in schedules) == [
        "complete_finished",
        "heal_pipeline",
        "prune_history",
        "sweep_lifecycle",
        "sweep_pending_allocations",
    ]
