"""Operating the pipeline from psql and the CLI: views, replays, bounded attempts, doctor."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import drain, one, wait_for, worker_settings
from workers.ops import commands as ops
from workers.runtime.worker import run_worker
from workers.settings import REPO_ROOT, Settings

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}
EVERY_DAY_A_HOLIDAY = (
    "INSERT INTO holidays SELECT d::date, 'closed' FROM generate_series("
    "current_date, current_date + 4 * 366, interval '1 day') d"
)


def test_trace_follows_a_payment_through_every_stage(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    trainer = f.trainer(conn)
    student = f.student(conn)
    payment = f.payment(conn, student, course, GOOD)
    drain(db_url)
    for key in (payment, student):
        row = one(conn, "SELECT * FROM purchase_trace WHERE %s IN (payment_id, student_id)", key)
        assert row["payment_id"] == payment
        assert row["purchase_id"] is not None
        assert (row["allocation_status"], row["trainer_id"]) == ("approved", trainer)
        assert row["sessions_written"] == 10
        assert row["payment_at"] <= row["purchase_at"] <= row["allocated_at"]
        assert row["allocated_at"] <= row["sessions_at"]
        assert (row["purchase_job"], row["allocation_job"], row["sessions_job"]) == (None,) * 3
    text = ops.trace(conn, payment)
    assert text is not None
    assert "On track: Trainer Ravi teaches it: 10 sessions written, 10 ahead." in text
    assert "first payment: 10 sessions; succeeded" in text
    assert "10 sessions written: numbers 1..10 of 10" in text


def test_stage_overview_counts_backlog_and_latency(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    f.payment(conn, f.student(conn), course, GOOD)
    drain(db_url)
    f.payment(conn, f.student(conn, name="Later"), course, GOOD)  # queued, no worker
    rows = {r["stage"]: r for r in conn.execute("SELECT * FROM stage_overview").fetchall()}
    assert list(rows) == ["purchase", "allocation", "sessions"]
    assert (rows["purchase"]["queued"], rows["purchase"]["in_flight"]) == (1, 0)
    assert rows["purchase"]["oldest_waiting"] is not None
    assert rows["allocation"]["queued"] == 0
    for stage in rows.values():
        assert stage["done_last_hour"] == 1
        assert stage["p50_latency"] is not None
        assert stage["p95_latency"] >= stage["p50_latency"]


def test_failed_job_is_visible_then_replayed_without_duplicates(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    conn.execute(EVERY_DAY_A_HOLIDAY)
    payment = f.payment(conn, f.student(conn), course, GOOD)
    drain(db_url)
    failed = one(conn, "SELECT * FROM failed_jobs")
    assert (failed["stage"], failed["ref_id"], failed["attempts"]) == ("purchase", payment, 1)
    assert failed["error_type"] == "ScheduleError"  # permanent: not retried
    assert "Traceback" in failed["traceback"]
    assert failed["row_data"]["id"] == str(payment)
    assert one(conn, "SELECT failed FROM stage_overview WHERE stage = 'purchase'")["failed"] == 1
    assert "ScheduleError" in ops.failures(conn)

    conn.execute("DELETE FROM holidays")
    assert one(conn, "SELECT replay_stage('purchase', %s) AS job", payment)["job"] is not None
    drain(db_url)
    assert conn.execute("SELECT * FROM failed_jobs").fetchall() == []
    assert one(conn, "SELECT count(*) AS n FROM tutoring_sessions")["n"] == 10
    # Replaying a stage that already ran duplicates nothing.
    conn.execute("SELECT replay_stage('purchase', %s)", (payment,))
    purchase = one(conn, "SELECT id FROM student_course_purchases")["id"]
    conn.execute("SELECT replay_stage('allocation', %s)", (purchase,))
    drain(db_url)
    counts = one(
        conn,
        """SELECT (SELECT count(*) FROM student_course_purchases) AS p,
        (SELECT count(*) FROM trainer_allocations) AS a,
        (SELECT count(*) FROM tutoring_sessions) AS s""",
    )
    assert dict(counts) == {"p": 1, "a": 1, "s": 10}
    events = [
        r["event"]
        for r in conn.execute(
            "SELECT event FROM stage_history WHERE ref_id = %s ORDER BY id", (payment,)
        )
    ]
    assert events == ["enqueued", "failed", "replayed", "succeeded", "replayed", "skipped"]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None]


def test_a_failed_job_is_logged_once_with_its_row(
    conn: Conn, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    course = f.course(conn)
    f.trainer(conn)
    conn.execute(EVERY_DAY_A_HOLIDAY)
    payment = f.payment(conn, f.student(conn), course, GOOD)
    with caplog.at_level(logging.INFO):
        drain(db_url)
    job = one(conn, "SELECT job_id FROM failed_jobs")["job_id"]
    # Not the stage runner's and pgqueuer's copies: one record, naming stage, row and job.
    [record] = tracebacks(caplog)
    assert (record.name, record.levelname) == ("workers.runtime.failures", "ERROR")
    assert record.getMessage().startswith(
        f"purchase {payment}: job {job} failed on start 1 and is held as failed"
    )
    assert (record.stage, record.ref, record.job_id) == ("purchase", str(payment), job)  # type: ignore[attr-defined]
    assert record.exc_info is not None and type(record.exc_info[1]).__name__ == "ScheduleError"


def test_a_retried_job_is_logged_once_per_failed_attempt(
    conn: Conn, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    course = f.course(conn)
    f.trainer(conn)
    payment = f.payment(conn, f.student(conn), course, GOOD)
    settings = Settings(  # type: ignore[call-arg]
        DATABASE_URL=db_url,
        KC_POOL_SIZE=4,
        KC_IDLE_POLL_SECONDS=0.1,
        KC_MAX_ATTEMPTS=2,
        KC_STATEMENT_TIMEOUT_SECONDS=0.5,
    )
    with psycopg.connect(db_url) as blocker, caplog.at_level(logging.INFO):
        # The stage waits for this lock until its statement times out: a retryable error.
        blocker.execute("SELECT 1 FROM payments WHERE id = %s FOR UPDATE", (payment,))
        asyncio.run(asyncio.wait_for(run_worker(db_url, settings, drain=True), 60))
    job = one(conn, "SELECT job_id FROM failed_jobs")["job_id"]
    records = tracebacks(caplog)
    assert [(r.name, r.levelname) for r in records] == [
        ("workers.runtime.failures", "WARNING"),
        ("workers.runtime.failures", "ERROR"),
    ]
    assert (
        records[0]
        .getMessage()
        .startswith(f"purchase {payment}: job {job} failed on start 1, retried in 0:00:01")
    )
    assert (
        records[1]
        .getMessage()
        .startswith(f"purchase {payment}: job {job} failed on start 2 and is held as failed")
    )
    assert {type(r.exc_info[1]).__name__ for r in records if r.exc_info} == {"QueryCanceled"}


def test_replay_every_failed_job_of_a_stage(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn, slot=("06:00", "22:00"))
    conn.execute(EVERY_DAY_A_HOLIDAY)
    for hour in (9, 11):
        f.payment(
            conn, f.student(conn, name=f"s{hour}"), course, {**GOOD, "timeSlot": f"{hour} AM"}
        )
    drain(db_url)
    assert one(conn, "SELECT count(*) AS n FROM failed_jobs")["n"] == 2
    conn.execute("DELETE FROM holidays")
    assert one(conn, "SELECT replay_failed('purchase') AS n")["n"] == 2
    assert one(conn, "SELECT replay_failed('purchase') AS n")["n"] == 0
    drain(db_url)
    assert one(conn, "SELECT count(*) AS n FROM student_course_purchases")["n"] == 2


def test_replay_refuses_unknown_stage_or_row(conn: Conn) -> None:
    for stage, ref in (
        ("billing", "00000000-0000-0000-0000-000000000000"),
        ("purchase", "00000000-0000-0000-0000-000000000000"),
    ):
        try:
            conn.execute("SELECT replay_stage(%s, %s)", (stage, ref))
        except psycopg.Error as exc:
            assert exc.diag.message_primary
        else:
            raise AssertionError(f"replay_stage({stage!r}) was accepted")


def test_stuck_rows_lists_rows_without_their_next_stage(conn: Conn) -> None:
    course = f.course(conn)
    with conn.transaction():
        conn.execute("ALTER TABLE payments DISABLE TRIGGER payments_enqueue_purchase")
        payment = f.payment(conn, f.student(conn), course, GOOD)
        conn.execute("ALTER TABLE payments ENABLE TRIGGER payments_enqueue_purchase")
    assert conn.execute("SELECT * FROM stuck_rows('1 hour')").fetchall() == []
    stuck = one(conn, "SELECT * FROM stuck_rows('0 seconds')")
    assert (stuck["stage"], stuck["ref_id"], stuck["job_status"]) == ("purchase", payment, None)


def test_prune_history_keeps_the_recent_window(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    f.payment(conn, f.student(conn), course, GOOD)
    drain(db_url)
    recent = one(conn, "SELECT count(*) AS n FROM stage_history")["n"]
    conn.execute(
        "INSERT INTO stage_history (stage, ref_id, event, at) "
        "SELECT 'purchase', gen_random_uuid(), 'succeeded', now() - interval '40 days' "
        "FROM generate_series(1, 5)"
    )
    pruned = one(conn, "SELECT * FROM prune_history('30 days')")
    assert pruned["history_deleted"] == 5
    assert one(conn, "SELECT count(*) AS n FROM stage_history")["n"] == recent


def _worker(db_url: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "DATABASE_URL": db_url, "KC_LOG_LEVEL": "INFO", **env}
    with open(log, "ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "workers", "run", "--single", "--no-migrate"],
            env=environment,
            stdout=sink,
            stderr=sink,
        )


def test_attempts_cut_short_by_crashes_are_counted(conn: Conn, db_url: str, tmp_path: Path) -> None:
    course = f.course(conn)
    f.trainer(conn)
    payment = f.payment(conn, f.student(conn), course, GOOD)
    log = tmp_path / "workers.log"
    settings = {"KC_MAX_ATTEMPTS": "2", "KC_HEARTBEAT_SECONDS": "1"}

    def starts() -> int:
        row = conn.execute("SELECT starts FROM job_starts").fetchone()
        return row["starts"] if row else 0

    # Hold the payment's row lock so that every attempt hangs inside the stage, then kill
    # the worker running it: the attempt never finishes, as in a crash mid-job.
    with psycopg.connect(db_url) as blocker:
        blocker.execute("SELECT 1 FROM payments WHERE id = %s FOR UPDATE", (payment,))
        for attempt in (1, 2):
            worker = _worker(db_url, log, **settings)
            wait_for(lambda n=attempt: starts() == n, 30, f"attempt {attempt} to start")  # type: ignore[misc]
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
        worker = _worker(db_url, log, **settings)
        try:
            wait_for(
                lambda: bool(conn.execute("SELECT 1 FROM failed_jobs").fetchone()),
                30,
                "the job to be held as failed",
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
        blocker.rollback()

    failed = one(conn, "SELECT * FROM failed_jobs")
    assert (failed["stage"], failed["ref_id"], failed["attempts"]) == ("purchase", payment, 3)
    assert failed["error_type"] == "TooManyAttemptsError"
    assert "started 2 times without success" in failed["error"]
    assert one(conn, "SELECT count(*) AS n FROM student_course_purchases")["n"] == 0


def test_doctor_names_each_problem_with_its_fix(conn: Conn, db_url: str, tmp_path: Path) -> None:
    settings = worker_settings(db_url)
    problems = ops.doctor(db_url, settings)
    assert [p.fix for p in problems] == ["make run-workers"]  # no worker yet

    conn.execute(
        "ALTER TABLE student_course_purchases DISABLE TRIGGER "
        "student_course_purchases_enqueue_allocation"
    )
    worker = _worker(db_url, tmp_path / "w.log")
    try:
        wait_for(
            lambda: not any("no worker" in p.what for p in ops.doctor(db_url, settings)),
            30,
            "the worker to be seen",
        )
        problems = ops.doctor(db_url, settings)
        assert [p.what for p in problems] == [
            "trigger student_course_purchases_enqueue_allocation on student_course_purchases "
            "is disabled"
        ]
        assert problems[0].fix.startswith("psql: ALTER TABLE student_course_purchases ENABLE")
        conn.execute(
            "ALTER TABLE student_course_purchases ENABLE TRIGGER "
            "student_course_purchases_enqueue_allocation"
        )
        assert ops.doctor(db_url, settings) == []
        status = subprocess.run(
            [sys.executable, "-m", "workers", "doctor"],
            env={**os.environ, "DATABASE_URL": db_url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)

    conn.execute("UPDATE alembic_version SET version_num = '0001'")
    assert [p.fix for p in ops.doctor(db_url, settings)] == ["make migrate"]


def test_doctor_names_held_jobs_and_an_unreachable_database(conn: Conn, db_url: str) -> None:
    settings = worker_settings(db_url)
    conn.execute(EVERY_DAY_A_HOLIDAY)
    f.payment(conn, f.student(conn), f.course(conn), GOOD)
    drain(db_url)
    problems = {p.what: p.fix for p in ops.doctor(db_url, settings)}
    assert problems["1 job(s) failed after their last attempt"].startswith("make failures;")

    nowhere = "postgresql://postgres@127.0.0.1:1/nothing"  # port 1: nothing listens there
    [problem] = ops.doctor(nowhere, settings)
    assert problem.what.startswith("the database is not reachable: ")
    assert "127.0.0.1" in problem.what and "cannot connect to the database" not in problem.what
    assert problem.fix.startswith("check DATABASE_URL")


def test_doctor_exit_status_is_1_and_make_says_2(db_url: str) -> None:
    """As README.md's "Exit status" says: the command's own 1, make's own 2."""

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            cwd=REPO_ROOT,
            env={**os.environ, "DATABASE_URL": db_url},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    direct = command(sys.executable, "-m", "workers", "doctor")
    assert (direct.returncode, direct.stdout.splitlines()[0]) == (
        1,
        "PROBLEM: no worker is running (nobody LISTENs on this database)",
    )
    made = command("make", "-s", "doctor")
    assert made.returncode == 2
    assert made.stdout == direct.stdout
    assert re.search(r"make(\[\d+\])?: \*\*\* \[Makefile:\d+: doctor\] Error 1", made.stderr)


def test_status_and_trace_commands(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    payment = f.payment(conn, f.student(conn), course, GOOD)
    drain(db_url)
    env = {**os.environ, "DATABASE_URL": db_url}
    status = subprocess.run(
        [sys.executable, "-m", "workers", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "p50_ms" in status.stdout and "allocation" in status.stdout
    trace = subprocess.run(
        [sys.executable, "-m", "workers", "trace", str(payment)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert str(payment) in trace.stdout and "approved" in trace.stdout
