"""trainer_load (migration 0020): each trainer's live (approved) allocations, kept by the
database and settled at commit. At every committed state it equals a recount of the rows,
whatever changed them (the pipeline, an admin, a refund, direct SQL, savepoints rolled back,
several transactions at once), and settling adds no lock cycle (two moves in opposite
directions commit side by side)."""

from __future__ import annotations

import random
import threading
from uuid import UUID

import psycopg
from psycopg.rows import DictRow, dict_row

from tests import factories as f
from tests.helpers import drain

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}

DIFFERENCES = """
SELECT t.id, coalesce(l.live_allocations, -1) AS kept,
       (SELECT count(*) FROM trainer_allocations ta
         WHERE ta.trainer_id = t.id AND ta.status = 'approved') AS counted
FROM trainers t LEFT JOIN trainer_load l ON l.trainer_id = t.id
WHERE coalesce(l.live_allocations, -1) <> (SELECT count(*) FROM trainer_allocations ta
                                           WHERE ta.trainer_id = t.id
                                             AND ta.status = 'approved')
"""


def differences(conn: Conn) -> list[DictRow]:
    return conn.execute(DIFFERENCES).fetchall()


def load(conn: Conn, trainer: UUID) -> int:
    row = conn.execute(
        "SELECT live_allocations FROM trainer_load WHERE trainer_id = %s", (trainer,)
    ).fetchone()
    assert row is not None
    return int(row["live_allocations"])


def pending_purchase(conn: Conn, course: UUID, n: int) -> tuple[UUID, UUID]:
    """A purchase (and its student) written without the pipeline, for direct allocations."""
    student = f.student(conn, name=f"Direct {n}")
    payment = f.payment(conn, student, course, {}, status="initiated")
    row = conn.execute(
        """INSERT INTO student_course_purchases (payment_id, student_id, course_id,
        purchase_tier, start_date, preferred_time_slot, schedule_mode, session_duration_minutes)
        VALUES (%s, %s, %s, 10, current_date + 1, make_time(8 + %s %% 10, 0, 0), 'daily', 60)
        RETURNING id""",
        (payment, student, course, n),
    ).fetchone()
    assert row is not None
    return UUID(str(row["id"])), student


def test_every_trainer_has_a_row_from_the_start(conn: Conn) -> None:
    trainer = f.trainer(conn)
    assert load(conn, trainer) == 0
    assert differences(conn) == []


def test_the_pipeline_keeps_the_count(conn: Conn, db_url: str) -> None:
    """Approvals, a refund, an admin's reassignment and a trainer who leaves: after each,
    the kept count is the recount."""
    course = f.course(conn)
    trainers = [f.trainer(conn, name=f"T{i}", rating=4.0 + i / 10) for i in range(3)]
    payments = []
    for i in range(6):
        student = f.student(conn, name=f"S{i}")
        payments.append(f.payment(conn, student, course, GOOD | {"timeSlot": f"{8 + i}:00"}))
    drain(db_url)
    assert sum(load(conn, t) for t in trainers) == 6
    assert differences(conn) == []

    conn.execute("UPDATE payments SET status = 'refunded' WHERE id = %s", (payments[0],))
    drain(db_url)
    assert sum(load(conn, t) for t in trainers) == 5
    assert differences(conn) == []

    allocation = conn.execute(
        "SELECT purchase_id, trainer_id FROM trainer_allocations WHERE status = 'approved' "
        "ORDER BY created_at LIMIT 1"
    ).fetchone()
    assert allocation is not None
    other = next(t for t in trainers if t != allocation["trainer_id"])
    conn.execute("SELECT assign_trainer(%s, %s)", (allocation["purchase_id"], other))
    drain(db_url)
    assert differences(conn) == []
    assert sum(load(conn, t) for t in trainers) == 5

    conn.execute("UPDATE trainers SET status = 'inactive' WHERE id = %s", (trainers[2],))
    drain(db_url)
    assert load(conn, trainers[2]) == 0
    assert differences(conn) == []


def test_the_count_is_settled_at_commit_and_follows_savepoints(conn: Conn) -> None:
    course = f.course(conn)
    trainer = f.trainer(conn)
    purchases = [pending_purchase(conn, course, n) for n in range(3)]
    insert = (
        "INSERT INTO trainer_allocations (purchase_id, student_id, course_id, trainer_id, "
        "status, first_session_date, allocated_at) "
        "VALUES (%s, %s, %s, %s, 'approved', current_date + 1, now())"
    )
    with conn.transaction():
        conn.execute(insert, (purchases[0][0], purchases[0][1], course, trainer))
        # Inside the transaction the count lags its own change; the capacity trigger and
        # the stage's re-check count rows.
        assert load(conn, trainer) == 0
        try:
            with conn.transaction():  # a savepoint, rolled back
                conn.execute(insert, (purchases[1][0], purchases[1][1], course, trainer))
                raise RuntimeError
        except RuntimeError:
            pass
    assert load(conn, trainer) == 1
    assert differences(conn) == []


def test_random_changes_keep_the_count(conn: Conn) -> None:
    """Seeded random statements of every kind (insert approved or pending, approve, cancel,
    complete, move to another trainer, delete, several rows at once), some in savepoints
    that are rolled back; after every commit the kept count is the recount."""
    rng = random.Random(25)
    course = f.course(conn)
    trainers = [f.trainer(conn, name=f"T{i}", rating=5.0) for i in range(4)]
    purchases = [pending_purchase(conn, course, n) for n in range(24)]
    for step in range(60):
        with conn.transaction():
            for _ in range(rng.randint(1, 3)):
                savepoint = rng.random() < 0.2
                try:
                    with conn.transaction() if savepoint else _nothing():
                        _random_change(conn, rng, course, trainers, purchases)
                        if savepoint:
                            raise _RolledBack
                except _RolledBack:
                    pass
        assert differences(conn) == [], f"step {step}"


class _RolledBack(Exception):
    pass


class _nothing:  # a do-nothing context manager
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _random_change(
    conn: Conn,
    rng: random.Random,
    course: UUID,
    trainers: list[UUID],
    purchases: list[tuple[UUID, UUID]],
) -> None:
    kind = rng.choice(("insert", "approve", "end", "move", "delete", "bulk"))
    live = conn.execute(
        "SELECT id, purchase_id, status, trainer_id FROM trainer_allocations "
        "WHERE status IN ('pending', 'approved')"
    ).fetchall()
    taken = {row["purchase_id"] for row in live}
    free = [p for p in purchases if p[0] not in taken]
    trainer = rng.choice(trainers)
    if kind == "insert" and free:
        purchase, student = rng.choice(free)
        status = rng.choice(("approved", "pending"))
        conn.execute(
            "INSERT INTO trainer_allocations (purchase_id, student_id, course_id, trainer_id, "
            "status, reason, reason_detail, first_session_date, allocated_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, current_date + 1, now())",
            (
                purchase,
                student,
                course,
                trainer if status == "approved" else None,
                status,
                None if status == "approved" else "no_free_slot",
                None if status == "approved" else "waits",
            ),
        )
    elif kind == "approve" and (waiting := [r for r in live if r["status"] == "pending"]):
        conn.execute(
            "UPDATE trainer_allocations SET status = 'approved', trainer_id = %s, reason = NULL, "
            "reason_detail = NULL WHERE id = %s",
            (trainer, rng.choice(waiting)["id"]),
        )
    elif kind == "end" and (approved := [r for r in live if r["status"] == "approved"]):
        conn.execute(
            "UPDATE trainer_allocations SET status = %s WHERE id = %s",
            (rng.choice(("cancelled", "completed")), rng.choice(approved)["id"]),
        )
    elif kind == "move" and (approved := [r for r in live if r["status"] == "approved"]):
        conn.execute(
            "UPDATE trainer_allocations SET trainer_id = %s WHERE id = %s",
            (trainer, rng.choice(approved)["id"]),
        )
    elif kind == "delete" and live:
        conn.execute("DELETE FROM trainer_allocations WHERE id = %s", (rng.choice(live)["id"],))
    elif kind == "bulk":
        conn.execute(
            "UPDATE trainer_allocations SET status = 'cancelled' "
            "WHERE status = 'approved' AND trainer_id = %s",
            (trainer,),
        )


def test_two_moves_in_opposite_directions_commit_side_by_side(conn: Conn, db_url: str) -> None:
    """X moves an allocation from A to B while Y moves one from B to A; both hold the capacity
    trigger's lock of their new trainer and commit at once. Settling locks both counters in
    trainer-id order, so neither waits for the other in a circle."""
    course = f.course(conn)
    a, b = f.trainer(conn, name="A"), f.trainer(conn, name="B")
    ids = []
    for n, trainer in enumerate((a, b)):
        purchase, student = pending_purchase(conn, course, n)
        row = conn.execute(
            "INSERT INTO trainer_allocations (purchase_id, student_id, course_id, trainer_id, "
            "status, first_session_date, allocated_at) "
            "VALUES (%s, %s, %s, %s, 'approved', current_date + 1, now()) RETURNING id",
            (purchase, student, course, trainer),
        ).fetchone()
        assert row is not None
        ids.append(row["id"])
    both_moved = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def move(allocation: UUID, to: UUID) -> None:
        try:
            with psycopg.connect(db_url, row_factory=dict_row) as other:
                other.execute("SET deadlock_timeout = '100ms'")
                other.execute(
                    "UPDATE trainer_allocations SET trainer_id = %s WHERE id = %s",
                    (to, allocation),
                )
                both_moved.wait()
                other.commit()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=move, args=(ids[0], b)),
        threading.Thread(target=move, args=(ids[1], a)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert (load(conn, a), load(conn, b)) == (1, 1)
    assert differences(conn) == []
