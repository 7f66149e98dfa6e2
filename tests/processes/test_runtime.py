"""The worker runtime: a supervisor that restarts dead workers, reconnection after the
database drops every connection, and a bounded, clean stop on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import psycopg
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import wait_for
from workers.runtime.worker import idle_poll, recovery_bound
from workers.settings import Settings

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}


def listeners(conn: Conn) -> int:
    row = conn.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = "
        "current_database() AND application_name = 'koding-caravan-listen'"
    ).fetchone()
    return int(row["n"]) if row else 0


def start(db_url: str, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "DATABASE_URL": db_url, "KC_LOG_LEVEL": "INFO", **env}
    with open(log, "ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "workers", "run", "--no-migrate", *args],
            env=environment,
            stdout=sink,
            stderr=sink,
        )


def sessions_for(conn: Conn, payment: object) -> int:
    row = conn.execute(
        """SELECT count(*) AS n FROM tutoring_sessions ts
        JOIN trainer_allocations ta ON ta.id = ts.allocation_id
        JOIN student_course_purchases pu ON pu.id = ta.purchase_id
        WHERE pu.payment_id = %s""",
        (payment,),
    ).fetchone()
    return int(row["n"]) if row else 0


def test_supervisor_restarts_a_killed_worker_and_stops_cleanly(
    conn: Conn, db_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    supervisor = start(db_url, log, "--processes", "2")
    try:
        wait_for(lambda: listeners(conn) == 2, 30, "two worker processes")
        children = psutil.Process(supervisor.pid).children()
        assert len(children) == 2
        children[0].send_signal(signal.SIGKILL)
        wait_for(
            lambda: (
                {c.pid for c in psutil.Process(supervisor.pid).children()}
                - {c.pid for c in children}
                != set()
            ),
            30,
            "a replacement process",
        )
        wait_for(lambda: listeners(conn) == 2, 30, "two listening workers again")

        course = f.course(conn)
        f.trainer(conn)
        payment = f.payment(conn, f.student(conn), course, GOOD)
        wait_for(lambda: sessions_for(conn, payment) == 10, 30, "the payment's sessions")
    finally:
        supervisor.send_signal(signal.SIGTERM)
        code = supervisor.wait(timeout=60)
    assert code == 0
    assert listeners(conn) == 0
    assert "exited with -9; restarting" in log.read_text()


def test_worker_reconnects_after_every_backend_is_terminated(
    conn: Conn, db_url: str, tmp_path: Path
) -> None:
    """With jobs in flight, a lost connection is one WARNING line (and one when it is back),
    not a traceback per job; the jobs cut short are done after the reconnection."""
    course = f.course(conn)
    f.trainer(conn)
    payments = [
        f.payment(conn, f.student(conn, name=slot), course, {**GOOD, "timeSlot": slot})
        for slot in ("9 AM", "11 AM", "1 PM", "4 PM")  # one trainer can take them all
    ]
    log = tmp_path / "worker.log"
    worker = start(db_url, log, "--single", KC_HEARTBEAT_SECONDS="2")
    blocker = psycopg.connect(db_url)
    try:
        # The purchase jobs wait on these row locks: all four are in flight at the loss.
        blocker.execute("SELECT 1 FROM payments FOR UPDATE")
        wait_for(lambda: count(conn, "job_starts") == 4, 30, "four jobs in flight")
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        wait_for(lambda: "connection back" in log.read_text(), 30, "the worker to reconnect")
        wait_for(lambda: listeners(conn) == 1, 30, "the worker listening again")
        assert worker.poll() is None
        wait_for(
            lambda: sum(sessions_for(conn, p) for p in payments) == 40,
            60,
            "the four payments' sessions",
        )
    finally:
        blocker.close()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    text = log.read_text()
    assert text.count("database connection lost") == 1, text
    assert text.count("database connection back") == 1, text
    assert "Traceback" not in text, text
    assert count(conn, "failed_jobs") == 0


def count(conn: Conn, relation: str) -> int:
    row = conn.execute(f"SELECT count(*) AS n FROM {relation}").fetchone()
    return int(row["n"]) if row else 0


def test_sigterm_stops_claiming_and_exits_within_the_bound(
    conn: Conn, db_url: str, tmp_path: Path
) -> None:
    course = f.course(conn)
    f.trainer(conn)
    payment = f.payment(conn, f.student(conn), course, GOOD)
    log = tmp_path / "worker.log"
    settings = {"KC_SHUTDOWN_SECONDS": "2", "KC_HEARTBEAT_SECONDS": "1"}
    with psycopg.connect(db_url) as blocker:
        # The job hangs in its stage on this lock: it is "in flight" when SIGTERM comes.
        blocker.execute("SELECT 1 FROM payments WHERE id = %s FOR UPDATE", (payment,))
        worker = start(db_url, log, "--single", **settings)
        wait_for(
            lambda: bool(conn.execute("SELECT 1 FROM job_starts").fetchone()),
            30,
            "the job to start",
        )
        stopped_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        assert time.monotonic() - stopped_at < 10
        blocker.rollback()
    # Nothing is lost: the unfinished job is picked again by the next worker.
    worker = start(db_url, log, "--single", **settings)
    try:
        wait_for(lambda: sessions_for(conn, payment) == 10, 30, "the payment's sessions")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    assert "leaving them to be picked again" in log.read_text()


def test_workers_exit_when_their_supervisor_is_killed(
    conn: Conn, db_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    supervisor = start(db_url, log, "--processes", "2")
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: listeners(conn) == 2, 30, "two worker processes")
        children = psutil.Process(supervisor.pid).children()
        assert len(children) == 2
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(timeout=30)
        # No orphan keeps working: each worker stops by itself, cleanly (SIGTERM).
        _, alive = psutil.wait_procs(children, timeout=60)
        assert alive == [], f"workers still running after their supervisor died: {alive}"
        wait_for(lambda: listeners(conn) == 0, 30, "no worker listening")
    finally:
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    stopped = [
        line for line in log.read_text().splitlines() if "workers.runtime.worker: worker" in line
    ]
    assert sum(line.endswith(" stopped") for line in stopped) == 2, stopped


def test_the_default_recovery_bound_is_ten_seconds_or_less() -> None:
    assert recovery_bound(Settings()) <= timedelta(seconds=10)


def test_idle_poll_follows_the_heartbeat_and_the_setting() -> None:
    slow = Settings(KC_HEARTBEAT_SECONDS=60, KC_IDLE_POLL_SECONDS=5)  # type: ignore[call-arg]
    assert idle_poll(slow) == timedelta(seconds=5)
    assert recovery_bound(slow) == timedelta(seconds=65)
    fast = Settings(KC_HEARTBEAT_SECONDS=4, KC_IDLE_POLL_SECONDS=5)  # type: ignore[call-arg]
    assert idle_poll(fast) == timedelta(seconds=1)


def test_a_job_of_a_killed_worker_is_done_by_another_with_the_default_heartbeat(
    conn: Conn, db_url: str, tmp_path: Path
) -> None:
    course = f.course(conn)
    f.trainer(conn)
    log = tmp_path / "workers.log"
    crashing = start(db_url, log, "--single")
    other: subprocess.Popen[bytes] | None = None
    blocker = psycopg.connect(db_url)
    try:
        # The purchase stage's INSERT waits on this lock: the job is in flight in `crashing`.
        blocker.execute("LOCK TABLE student_course_purchases IN EXCLUSIVE MODE")
        payment = f.payment(conn, f.student(conn), course, GOOD)
        wait_for(lambda: starts(conn) == 1, 30, "the first worker to start the job")
        other = start(db_url, log, "--single")
        wait_for(lambda: listeners(conn) == 2, 30, "the second worker")
        crashing.send_signal(signal.SIGKILL)
        crashing.wait(timeout=30)
        blocker.rollback()
        wait_for(lambda: starts(conn) == 2, 60, "another worker to pick the job again")
        wait_for(lambda: sessions_for(conn, payment) == 10, 30, "the payment's sessions")
    finally:
        blocker.close()
        for proc in (crashing, other):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


def starts(conn: Conn) -> int:
    row = conn.execute("SELECT coalesce(max(starts), 0) AS n FROM job_starts").fetchone()
    return int(row["n"]) if row else 0
