"""A worker runs the jobs of one stage it claimed together, in one transaction: a row that
fails inside a batch fails alone (held or retried by the usual policy) while the rest of the
batch commits."""

from __future__ import annotations

import asyncio
from uuid import UUID

import psycopg
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import run_one
from workers.runtime.worker import run_worker
from workers.settings import Settings
from workers.stages.contract import Stage

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}
ROWS = 6


def drain_in_batches(db_url: str) -> None:
    """A real worker that claims every queued job in one dequeue and runs each stage's jobs
    as one batch."""
    settings = Settings(  # type: ignore[call-arg]
        DATABASE_URL=db_url,
        KC_POOL_SIZE=4,
        KC_IDLE_POLL_SECONDS=0.1,
        KC_BATCH_SIZE=50,
        KC_STAGE_BATCH_SIZE=50,
    )
    asyncio.run(asyncio.wait_for(run_worker(db_url, settings, drain=True), 60))


def purchases(conn: Conn) -> list[tuple[UUID, UUID]]:
    """ROWS students, each with a trainer of their own and a payment made into a purchase
    (purchase stage run outside the queue): (student, purchase) pairs; one allocation job
    each is queued."""
    course = f.course(conn)
    made = []
    for i in range(ROWS):
        student = f.student(conn, name=f"Student {i}")
        f.trainer(conn, name=f"Trainer {i}")
        payment = f.payment(conn, student, course, GOOD)
        run_one(conn.info.dsn, Stage.PURCHASE, payment)
        row = conn.execute(
            "SELECT id FROM student_course_purchases WHERE payment_id = %s", (payment,)
        ).fetchone()
        assert row is not None
        made.append((student, row["id"]))
    return made


def history(conn: Conn, stage: str) -> list[DictRow]:
    return conn.execute(
        "SELECT ref_id, event, xmin::text AS tx FROM stage_history WHERE stage = %s "
        "AND event IN ('succeeded', 'skipped', 'failed') ORDER BY id",
        (stage,),
    ).fetchall()


def sessions_of(conn: Conn, purchase: UUID) -> int:
    row = conn.execute(
        "SELECT count(*) AS n FROM tutoring_sessions ts JOIN trainer_allocations ta "
        "ON ta.id = ts.allocation_id WHERE ta.purchase_id = %s",
        (purchase,),
    ).fetchone()
    return int(row["n"]) if row else 0


def assert_held_alone(
    conn: Conn, stage: str, poison: UUID, others: list[UUID], *, one_transaction: bool
) -> None:
    lines = history(conn, stage)
    by_ref = {line["ref_id"]: line for line in lines}
    assert by_ref[poison]["event"] == "failed"
    assert all(by_ref[ref]["event"] == "succeeded" for ref in others)
    transactions = {by_ref[ref]["tx"] for ref in [poison, *others]}
    if one_transaction:  # one xmin on every line: the rows were one batch, one transaction
        assert len(transactions) == 1
    else:  # the allocation stage commits each purchase on its own
        assert len(transactions) == ROWS
    failed = conn.execute("SELECT stage, ref_id, attempts, error FROM failed_jobs").fetchall()
    assert [(r["stage"], r["ref_id"], r["attempts"]) for r in failed] == [(stage, poison, 1)]
    assert "'Mars/Base' is not an IANA time zone" in failed[0]["error"]


def test_a_poison_purchase_in_an_allocation_batch_is_held_alone(conn: Conn, db_url: str) -> None:
    made = purchases(conn)
    poison_student, poison = made[2]
    conn.execute("UPDATE students SET timezone = 'Mars/Base' WHERE id = %s", (poison_student,))
    drain_in_batches(db_url)
    others = [purchase for _, purchase in made if purchase != poison]
    assert_held_alone(conn, "allocation", poison, others, one_transaction=False)
    live = conn.execute(
        "SELECT purchase_id, status FROM trainer_allocations WHERE status IN "
        "('pending', 'approved')"
    ).fetchall()
    assert {r["purchase_id"]: r["status"] for r in live} == dict.fromkeys(others, "approved")
    assert [sessions_of(conn, p) for p in others] == [10] * (ROWS - 1)


def test_a_poison_allocation_in_a_sessions_batch_is_held_alone(conn: Conn, db_url: str) -> None:
    made = purchases(conn)
    for _, purchase in made:
        run_one(db_url, Stage.ALLOCATION, purchase)
    # Their queued allocation jobs would only find the work done (run_one did it above).
    conn.execute("DELETE FROM pgqueuer WHERE entrypoint = 'allocation'")
    allocations = {
        r["purchase_id"]: r["id"]
        for r in conn.execute("SELECT purchase_id, id FROM trainer_allocations").fetchall()
    }
    poison_student, poison_purchase = made[4]
    conn.execute("UPDATE students SET timezone = 'Mars/Base' WHERE id = %s", (poison_student,))
    drain_in_batches(db_url)
    others = [purchase for _, purchase in made if purchase != poison_purchase]
    assert_held_alone(
        conn,
        "sessions",
        allocations[poison_purchase],
        [allocations[p] for p in others],
        one_transaction=True,
    )
    assert sessions_of(conn, poison_purchase) == 0
    assert [sessions_of(conn, p) for p in others] == [10] * (ROWS - 1)
    # Once the row is fixed, the operator's replay writes its sessions.
    conn.execute("UPDATE students SET timezone = 'Asia/Kolkata' WHERE id = %s", (poison_student,))
    conn.execute("SELECT replay_stage('sessions', %s)", (allocations[poison_purchase],))
    drain_in_batches(db_url)
    assert sessions_of(conn, poison_purchase) == 10


def test_an_upgrade_in_the_batch_of_its_purchase_is_applied_after_it(
    conn: Conn, db_url: str
) -> None:
    course = f.course(conn)
    f.trainer(conn)
    student = f.student(conn)
    with conn.transaction():  # both jobs queued at once: one purchase batch
        f.payment(conn, student, course, GOOD)
        f.payment(conn, student, course, {"upgrade": True, "sessionCount": 20})
    drain_in_batches(db_url)
    purchase = conn.execute("SELECT id, purchase_tier FROM student_course_purchases").fetchall()
    assert [p["purchase_tier"] for p in purchase] == [20]
    assert sessions_of(conn, purchase[0]["id"]) == 20
    assert conn.execute("SELECT count(*) AS n FROM payment_rejections").fetchone() == {"n": 0}
    lines = history(conn, "purchase")
    assert [line["event"] for line in lines] == ["succeeded", "succeeded"]
    assert len({line["tx"] for line in lines}) == 1
