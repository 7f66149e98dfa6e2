"""More students than trainers (issue 22): no deadlock, sessions before retries, one retry
per change.

The burst of the issue runs on real worker processes (`make run-workers`: a supervisor and
its two workers) over bench/scarce.py's world: 200 payments in one transaction, 20 trainers.
The mechanisms are also tested one by one: a trainer who does not fit is unlocked before the
next is tried; jobs are claimed by priority; a statement retries each waiting purchase once
and writes one history line for it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import psycopg
from psycopg.rows import DictRow, dict_row

from bench import scarce
from tests import factories as f
from tests.helpers import drain, full_trainer, one, wait_for
from tests.invariants import violations
from workers.database.connections import fetch_one
from workers.database.sql import q
from workers.rules.matching import Reason
from workers.runtime.worker import run_worker
from workers.settings import Settings
from workers.stages.search import remaining_plan, still_fits

Conn = psycopg.Connection[DictRow]
METADATA = {"sessionCount": 10, "scheduleMode": "daily"}


def deadlocks(conn: Conn) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(
        one(conn, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")[
            "deadlocks"
        ]
    )


def test_the_scarce_burst_settles_without_a_deadlock(
    conn: Conn, db_url: str, tmp_path: Path
) -> None:
    """Fails on 0013: 107-155 deadlocks per run, and purchases held as failed after five."""
    scarce.seed(conn)
    before = deadlocks(conn)
    log = tmp_path / "workers.log"
    env = {**os.environ, "DATABASE_URL": db_url, "KC_LOG_LEVEL": "INFO"}
    with log.open("ab") as sink:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "workers", "run", "--no-migrate"],
            env=env,
            stdout=sink,
            stderr=sink,
        )
    try:
        with conn.transaction():
            scarce.pay(conn)

        def settled() -> bool:
            row = one(
                conn,
                """SELECT count(*) FILTER (WHERE ta.status IN ('pending', 'approved')) AS live,
                          (SELECT count(*) FROM pgqueuer WHERE status IN ('queued', 'picked'))
                              AS jobs
                   FROM trainer_allocations ta""",
            )
            return bool(row["live"] == scarce.STUDENTS and row["jobs"] == 0)

        wait_for(settled, 240, "every purchase to be approved with its sessions, or pending")
    finally:
        supervisor.send_signal(signal.SIGTERM)
        code = supervisor.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert code == 0, text[-5000:]

    assert deadlocks(conn) - before == 0
    assert "deadlock detected" not in text
    assert violations(conn) == {}, text[-20000:]
    outcome = one(
        conn,
        """SELECT count(*) FILTER (WHERE status = 'approved') AS approved,
                  count(*) FILTER (WHERE status = 'pending') AS pending
           FROM trainer_allocations""",
    )
    approved = scarce.expected_approvals()
    assert outcome == {"approved": approved, "pending": scarce.STUDENTS - approved}
    history = one(
        conn,
        """SELECT count(*) FILTER (WHERE event = 'failed') AS failed,
                  count(*) FILTER (WHERE stage = 'allocation' AND event = 'enqueued')
                      AS allocation_enqueued,
                  count(*) FILTER (WHERE stage = 'allocation' AND event = 'succeeded')
                      AS allocation_runs
           FROM stage_history""",
    )
    # Nothing failed, and nothing made a purchase try again: one job and one run each.
    assert history == {
        "failed": 0,
        "allocation_enqueued": scarce.STUDENTS,
        "allocation_runs": scarce.STUDENTS,
    }


async def _checked(db_url: str, purchase_id: UUID, trainers: list[UUID]) -> list[object]:
    """In one transaction: still_fits for each trainer in turn, and after each, how many
    trainer locks this transaction holds and whether its live allocation is still live."""
    seen: list[object] = []
    aconn = await psycopg.AsyncConnection.connect(db_url, row_factory=dict_row)
    async with aconn, aconn.transaction():
        purchase = await fetch_one(
            aconn, q("lock_purchase_for_allocation"), {"purchase_id": purchase_id}
        )
        assert purchase is not None
        sessions = await remaining_plan(
            aconn, purchase, replacing=purchase["live_allocation_id"], holidays=set()
        )
        assert len(sessions) == 10
        for trainer in trainers:
            why = await still_fits(
                aconn,
                trainer,
                purchase,
                sessions,
                replacing=purchase["live_allocation_id"],
                ending="a test",
            )
            state = await fetch_one(
                aconn,
                """SELECT (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                             AND pid = pg_backend_pid()) AS locks,
                          (SELECT status FROM trainer_allocations
                            WHERE id = %(id)s::uuid) AS live""",
                {"id": purchase["live_allocation_id"]},
            )
            assert state is not None
            seen.append((why, state["locks"], state["live"]))
        raise psycopg.Rollback()
    return seen


def test_a_trainer_who_does_not_fit_is_unlocked_before_the_next_is_tried(
    conn: Conn, db_url: str
) -> None:
    """The lock order that makes deadlocks impossible: a trainer's lock is kept only when
    they fit; otherwise it is released (and the allocation being replaced stands again)
    before another trainer's lock is asked for. Fails on 0013: the lock stayed."""
    course, full, students = full_trainer(conn, db_url, METADATA)
    free = f.trainer(conn, name="free", lat=f.HOME[0] + 0.02, slot=("06:00", "23:00"))
    drain(db_url)  # the fifth student takes the free trainer
    other = f.student(conn, name="other")
    f.payment(conn, other, course, {**METADATA, "timeSlot": "18:00"})
    drain(db_url)
    purchase = one(conn, "SELECT id FROM student_course_purchases WHERE student_id = %s", other)
    assert one(
        conn,
        "SELECT trainer_id FROM trainer_allocations WHERE purchase_id = %s AND status = 'approved'",
        purchase["id"],
    ) == {"trainer_id": free}

    seen = asyncio.run(_checked(db_url, purchase["id"], [full, free]))
    assert seen == [
        (Reason.AT_CAPACITY, 0, "approved"),  # released, and the live allocation restored
        (None, 1, "cancelled"),  # kept: the lock, and the replaced allocation ended
    ]
    assert len(students) == 5


def _pending_world(conn: Conn, db_url: str, waiting: int) -> tuple[UUID, UUID, list[UUID]]:
    """A course whose one trainer (capacity 4) is full, and `waiting` more purchases of it
    pending: (course, trainer, the pending purchases)."""
    course = f.course(conn)
    trainer = f.trainer(conn, rating=None, slot=("06:00", "23:00"))
    with conn.transaction():
        for i in range(4 + waiting):
            student = f.student(conn, name=f"s{i}", lat=f.HOME[0] + i / 10000)
            f.payment(conn, student, course, {**METADATA, "timeSlot": f"{6 + i % 16}:00"})
    drain(db_url)
    pending = [
        r["purchase_id"]
        for r in conn.execute(
            "SELECT purchase_id FROM trainer_allocations WHERE status = 'pending' "
            "ORDER BY purchase_id"
        ).fetchall()
    ]
    assert len(pending) == waiting
    return course, trainer, pending


def _enqueued_since(conn: Conn, mark: int) -> dict[UUID, int]:
    rows = conn.execute(
        "SELECT ref_id, count(*) AS n FROM stage_history "
        "WHERE id > %s AND stage = 'allocation' AND event = 'enqueued' GROUP BY ref_id",
        (mark,),
    ).fetchall()
    return {r["ref_id"]: r["n"] for r in rows}


def _mark(conn: Conn) -> int:
    return int(one(conn, "SELECT coalesce(max(id), 0) AS m FROM stage_history")["m"])


def test_a_change_retries_each_waiting_purchase_once(conn: Conn, db_url: str) -> None:
    """Issue 21, item 10: one retry and one `enqueued` line per waiting purchase for a
    statement, however many rows it changed; none for a change its queued job absorbs.
    Fails on 0013: activating a trainer and writing their week wrote 8 lines per purchase."""
    course, _, pending = _pending_world(conn, db_url, 6)
    newcomer = f.trainer(
        conn, name="newcomer", status="inactive", weekdays=(), lat=f.HOME[0] + 0.02
    )
    assert conn.execute("DELETE FROM pgqueuer").rowcount == 0  # an inactive trainer: no retry

    mark = _mark(conn)
    with conn.transaction():
        conn.execute("UPDATE trainers SET status = 'active' WHERE id = %s", (newcomer,))
        conn.execute(
            "INSERT INTO trainer_availability SELECT %s, d, '06:00', '23:00' "
            "FROM generate_series(1, 7) AS d",
            (newcomer,),
        )
        for day in range(1, 8):  # seven more statements, while the jobs are still queued
            conn.execute(
                "UPDATE trainer_availability SET slot_end = '23:30' "
                "WHERE trainer_id = %s AND weekday = %s",
                (newcomer, day),
            )
    assert _enqueued_since(conn, mark) == dict.fromkeys(pending, 1)
    jobs = conn.execute(
        "SELECT convert_from(payload, 'UTF8')::uuid AS ref FROM pgqueuer ORDER BY ref"
    ).fetchall()
    assert [j["ref"] for j in jobs] == pending

    # Four approved allocations ending in one statement free capacity once.
    conn.execute("DELETE FROM pgqueuer")
    mark = _mark(conn)
    conn.execute(
        "UPDATE trainer_allocations SET status = 'cancelled', updated_at = now() "
        "WHERE status = 'approved'"
    )
    assert _enqueued_since(conn, mark) == dict.fromkeys(pending, 1)
    assert course is not None


def test_an_enqueue_absorbed_by_a_job_writes_no_history(conn: Conn) -> None:
    """One `enqueued` line when a job is created, none when a queued job absorbs the
    request; an operator's replay is recorded either way. Fails on 0013 (two lines)."""
    payment = f.payment(conn, f.student(conn), f.course(conn), METADATA)  # enqueues it
    conn.execute("SELECT enqueue_stage('purchase', %s)", (payment,))
    conn.execute("SELECT replay_stage('purchase', %s)", (payment,))
    events = [
        r["event"]
        for r in conn.execute(
            "SELECT event FROM stage_history WHERE ref_id = %s ORDER BY id", (payment,)
        ).fetchall()
    ]
    assert events == ["enqueued", "replayed"]
    assert one(conn, "SELECT count(*) AS n FROM pgqueuer")["n"] == 1


def test_jobs_have_priorities_by_stage_and_retries_come_last(conn: Conn, db_url: str) -> None:
    """Sessions 30, allocation 20, purchase 10; another try for a waiting purchase 0, raised
    when an admin's request asks for it again. Fails on 0013 (every job 0)."""
    course, trainer, pending = _pending_world(conn, db_url, 2)
    conn.execute("UPDATE trainers SET rating = 3.0 WHERE id = %s", (trainer,))  # a retry
    payment = f.payment(conn, f.student(conn, name="new"), course, METADATA)
    allocation = one(conn, "SELECT id FROM trainer_allocations WHERE status = 'approved' LIMIT 1")
    conn.execute("SELECT enqueue_stage('sessions', %s)", (allocation["id"],))
    priorities = {
        (r["entrypoint"], r["ref"]): r["priority"]
        for r in conn.execute(
            "SELECT entrypoint, convert_from(payload, 'UTF8')::uuid AS ref, priority FROM pgqueuer"
        ).fetchall()
    }
    assert priorities == {
        ("allocation", pending[0]): 0,
        ("allocation", pending[1]): 0,
        ("purchase", payment): 10,
        ("sessions", allocation["id"]): 30,
    }
    conn.execute("SELECT assign_trainer(%s, %s)", (pending[0], trainer))
    raised = one(
        conn,
        "SELECT priority FROM pgqueuer WHERE dedupe_key = %s",
        f"allocation:{pending[0]}",
    )
    assert raised == {"priority": 20}
    drain(db_url)
    new = one(conn, "SELECT id FROM student_course_purchases WHERE payment_id = %s", payment)
    fresh = one(
        conn,
        "SELECT priority FROM pgqueuer_log WHERE entrypoint = 'allocation' AND status = 'queued' "
        "AND job_id = (SELECT job_id FROM stage_history WHERE ref_id = %s "
        "AND event = 'enqueued')",
        new["id"],
    )
    assert fresh == {"priority": 20}


def test_sessions_and_new_payments_are_claimed_before_retries(conn: Conn, db_url: str) -> None:
    """A worker claims the sessions of an approved allocation and a new payment before a
    pile of retries queued ahead of them. Fails on 0013 (claimed in the order queued)."""
    course, trainer, pending = _pending_world(conn, db_url, 12)
    allocation = one(conn, "SELECT id FROM trainer_allocations WHERE status = 'approved' LIMIT 1")
    with conn.transaction():
        conn.execute("UPDATE trainers SET rating = 3.0 WHERE id = %s", (trainer,))  # 12 retries
        payment = f.payment(conn, f.student(conn, name="new"), course, METADATA)
        conn.execute("SELECT enqueue_stage('sessions', %s)", (allocation["id"],))
    mark = int(one(conn, "SELECT coalesce(max(id), 0) AS m FROM pgqueuer_log")["m"])

    settings = Settings(  # type: ignore[call-arg]
        DATABASE_URL=db_url, KC_BATCH_SIZE=1, KC_POOL_SIZE=2, KC_IDLE_POLL_SECONDS=0.1
    )
    asyncio.run(asyncio.wait_for(run_worker(db_url, settings, drain=True), 120))
    picked = conn.execute(
        "SELECT l.entrypoint, h.ref_id FROM pgqueuer_log l "
        "JOIN LATERAL (SELECT ref_id FROM stage_history WHERE job_id = l.job_id LIMIT 1) h "
        "ON true WHERE l.id > %s AND l.status = 'picked' ORDER BY l.id",
        (mark,),
    ).fetchall()
    order = [(r["entrypoint"], r["ref_id"]) for r in picked]
    assert set(order[:2]) == {("sessions", allocation["id"]), ("purchase", payment)}
    new = one(conn, "SELECT id FROM student_course_purchases WHERE payment_id = %s", payment)
    # Its allocation is queued when the purchase commits: by then the worker has claimed at
    # most two more jobs (its pool of two), retries among them; never the whole pile.
    assert order.index(("allocation", new["id"])) <= 4
    assert sorted(r for stage, r in order if stage == "allocation" and r != new["id"]) == pending
    wait_for(lambda: violations(conn) == {}, 5, "the invariants")
