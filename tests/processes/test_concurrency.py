"""Many workers allocating at once for scarce trainers: capacity and time are never oversold.

Real worker processes (the same command as `make run-workers`) race for two scarce resources:
one trainer's capacity (4 allocations, 12 purchases at different hours) and two trainers'
single time slot (10 purchases at the same hour). The database's locks and constraints are
also raced directly with concurrent transactions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import psycopg
from psycopg.rows import DictRow, dict_row

from tests import factories as f
from tests.helpers import wait_for
from tests.invariants import violations

Conn = psycopg.Connection[DictRow]
WORKERS = 4


def start_workers(db_url: str, count: int, log: Path) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "KC_BATCH_SIZE": "1",
        "KC_IDLE_POLL_SECONDS": "0.5",
        "KC_LOG_LEVEL": "INFO",
    }
    with open(log, "ab") as sink:
        return [
            subprocess.Popen(
                [sys.executable, "-m", "workers", "run", "--single", "--no-migrate"],
                env=env,
                stdout=sink,
                stderr=sink,
            )
            for _ in range(count)
        ]


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    return [proc.wait(timeout=30) for proc in procs]


def queue_empty(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT count(*) AS n FROM pgqueuer WHERE status IN ('queued', 'picked')"
    ).fetchone()
    return row is not None and row["n"] == 0


def test_concurrent_workers_never_oversell_a_trainer(
    conn: Conn, db_url: str, tmp_path: Path
) -> None:
    scarce_course = f.course(conn, category="AI", subcategory=None, title="AI")
    scarce = f.trainer(conn, specialties=["AI"], rating=None, slot=("06:00", "23:00"))
    slot_course = f.course(conn, category="Coding", subcategory=None, title="Coding")
    slot_trainers = [f.trainer(conn, specialties=["Coding"], name=f"c{i}") for i in range(2)]
    with conn.transaction():
        for hour in range(8, 20):
            student = f.student(conn, name=f"ai{hour}", lat=f.HOME[0] + hour / 10000)
            f.payment(
                conn,
                student,
                scarce_course,
                {"sessionCount": 10, "timeSlot": f"{hour}:00", "scheduleMode": "daily"},
            )
        for i in range(10):
            student = f.student(conn, name=f"code{i}", lat=f.HOME[0] - i / 10000)
            f.payment(
                conn,
                student,
                slot_course,
                {"sessionCount": 20, "timeSlot": "4 PM", "scheduleMode": "weekdays"},
            )

    log = tmp_path / "workers.log"
    procs = start_workers(db_url, WORKERS, log)
    try:

        def settled() -> bool:
            row = conn.execute("""SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                count(*) AS live FROM trainer_allocations
                WHERE status IN ('pending', 'approved')""").fetchone()
            return queue_empty(conn) and row is not None and row["live"] == 22

        wait_for(settled, 90, "every purchase to have a live allocation")
    finally:
        codes = stop_workers(procs)
    assert codes == [0] * WORKERS

    assert violations(conn) == {}, log.read_text()[-20000:]
    approved = conn.execute("""SELECT trainer_id, count(*) AS n FROM trainer_allocations
        WHERE status = 'approved' GROUP BY trainer_id""").fetchall()
    by_trainer = {row["trainer_id"]: row["n"] for row in approved}
    assert by_trainer == {scarce: 4, slot_trainers[0]: 1, slot_trainers[1]: 1}
    reasons = conn.execute("""SELECT reason, count(*) AS n FROM trainer_allocations
        WHERE status = 'pending' GROUP BY reason ORDER BY reason""").fetchall()
    assert {r["reason"]: r["n"] for r in reasons} == {"at_capacity": 8, "no_free_slot": 8}
    failed = conn.execute("SELECT count(*) AS n FROM pgqueuer WHERE status = 'failed'").fetchone()
    assert failed is not None and failed["n"] == 0


def race(admin_url: str, count: int, body: Callable[[Conn], None]) -> tuple[int, list[str]]:
    """Run `body` in `count` concurrent transactions released together; count commits."""
    barrier = threading.Barrier(count)
    committed = 0
    errors: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        nonlocal committed
        with psycopg.connect(admin_url, row_factory=dict_row) as c:
            barrier.wait()
            try:
                with c.transaction():
                    body(c)
                    time.sleep(0.05)  # hold the transaction open while the others arrive
                with lock:
                    committed += 1
            except psycopg.Error as exc:
                with lock:
                    errors.append(type(exc).__name__)

    threads = [threading.Thread(target=attempt) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return committed, errors


def _purchases(conn: Conn, n: int) -> list[tuple[UUID, UUID, UUID]]:
    course = f.course(conn)
    rows = []
    for i in range(n):
        student = f.student(conn, name=f"p{i}")
        payment = f.payment(conn, student, course, {}, status="initiated")
        purchase = conn.execute(
            """INSERT INTO student_course_purchases (payment_id, student_id,
            course_id, purchase_tier, start_date, preferred_time_slot, schedule_mode,
            session_duration_minutes) VALUES (%s, %s, %s, 10, current_date + 1, '16:00',
            'daily', 60) RETURNING id""",
            (payment, student, course),
        ).fetchone()
        assert purchase is not None
        rows.append((purchase["id"], student, course))
    return rows


def test_database_caps_concurrent_approvals(conn: Conn, db_url: str) -> None:
    trainer = f.trainer(conn, rating=3.2)  # capacity 5
    purchases = iter(_purchases(conn, 12))
    pick = threading.Lock()

    def approve(c: Conn) -> None:
        with pick:
            purchase, student, course = next(purchases)
        c.execute(
            """INSERT INTO trainer_allocations (purchase_id, student_id, course_id,
            trainer_id, status, first_session_date, allocated_at)
            VALUES (%s, %s, %s, %s, 'approved', current_date + 1, now())""",
            (purchase, student, course, trainer),
        )

    committed, errors = race(db_url, 12, approve)
    assert committed == 5
    assert errors == ["CheckViolation"] * 7


def test_database_refuses_concurrent_double_booking(conn: Conn, db_url: str) -> None:
    trainer = f.trainer(conn, rating=4.9)  # capacity 8: only the time can refuse
    purchases = iter(_purchases(conn, 8))
    pick = threading.Lock()
    start = datetime(2030, 1, 7, 10, 30, tzinfo=UTC)

    def book(c: Conn) -> None:
        with pick:
            purchase, student, course = next(purchases)
        row = c.execute(
            """INSERT INTO trainer_allocations (purchase_id, student_id, course_id,
            trainer_id, status, first_session_date, allocated_at)
            VALUES (%s, %s, %s, %s, 'approved', current_date + 1, now()) RETURNING id""",
            (purchase, student, course, trainer),
        ).fetchone()
        assert row is not None
        offset = timedelta(minutes=10 * (hash(purchase) % 5))  # all within one hour
        c.execute(
            """INSERT INTO tutoring_sessions (allocation_id, session_number, student_id,
            trainer_id, course_id, scheduled_date, scheduled_time, starts_at, ends_at,
            duration_minutes) VALUES (%s, 1, %s, %s, %s, '2030-01-07', '16:00', %s, %s, 60)""",
            (
                row["id"],
                student,
                trainer,
                course,
                start + offset,
                start + offset + timedelta(minutes=60),
            ),
        )

    committed, errors = race(db_url, 8, book)
    assert committed == 1
    assert errors == ["ExclusionViolation"] * 7
