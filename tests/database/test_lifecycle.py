"""Schedules and the purchase lifecycle through the real triggers and workers: modes,
holidays, time zones, upgrades, refunds, healing."""

from __future__ import annotations

from datetime import UTC, date, time, timedelta
from uuid import UUID

import psycopg
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import drain, one
from tests.invariants import violations

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}


def sessions_of(conn: Conn, student: UUID, status: str = "scheduled") -> list[DictRow]:
    return conn.execute(
        "SELECT * FROM tutoring_sessions WHERE student_id = %s AND status = %s "
        "ORDER BY session_number",
        (student, status),
    ).fetchall()


def test_sunday_only_schedule_skips_holidays(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn, weekdays=[7])
    student = f.student(conn)
    start = date.today() + timedelta(days=30)
    first_sunday = start + timedelta(days=(7 - start.isoweekday()) % 7)
    holiday = first_sunday + timedelta(days=7)
    conn.execute("INSERT INTO holidays VALUES (%s, 'Diwali')", (holiday,))
    f.payment(
        conn,
        student,
        course,
        {
            "sessionCount": 10,
            "timeSlot": "10 AM",
            "scheduleMode": "sunday_only",
            "startDate": start.isoformat(),
        },
    )
    drain(db_url)
    rows = sessions_of(conn, student)
    assert len(rows) == 10
    assert all(r["scheduled_date"].isoweekday() == 7 for r in rows)
    assert holiday not in {r["scheduled_date"] for r in rows}
    assert rows[0]["scheduled_date"] == first_sunday
    assert {r["duration_minutes"] for r in rows} == {80}


def test_local_time_and_instant_in_a_dst_zone(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    student = f.student(conn, timezone="Europe/Berlin")
    f.payment(conn, student, course, {**GOOD, "startDate": "2027-10-25"})  # DST ends 10-31
    drain(db_url)
    rows = sessions_of(conn, student)
    assert {r["scheduled_time"] for r in rows} == {time(16)}
    change = date(2027, 10, 31)
    summer = [r for r in rows if r["scheduled_date"] < change]
    winter = [r for r in rows if r["scheduled_date"] >= change]
    assert summer and winter
    # 16:00 in Berlin is 14:00 UTC in summer time and 15:00 UTC after the change.
    assert {r["starts_at"].astimezone(UTC).hour for r in summer} == {14}
    assert {r["starts_at"].astimezone(UTC).hour for r in winter} == {15}


def test_upgrade_appends_sessions_with_the_same_trainer(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    trainer = f.trainer(conn)
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    last_before = sessions_of(conn, student)[-1]["scheduled_date"]

    upgrade = f.payment(conn, student, course, {"sessionCount": 20, "upgrade": True})
    drain(db_url)
    rows = sessions_of(conn, student)
    assert [r["session_number"] for r in rows] == list(range(1, 21))
    assert {r["trainer_id"] for r in rows} == {trainer}
    assert rows[10]["scheduled_date"] > last_before
    assert one(conn, "SELECT purchase_tier FROM student_course_purchases")["purchase_tier"] == 20
    assert one(conn, "SELECT count(*) AS n FROM trainer_allocations")["n"] == 1

    # Replaying the upgrade payment duplicates nothing.
    conn.execute("SELECT enqueue_stage('purchase', %s)", (upgrade,))
    drain(db_url)
    assert len(sessions_of(conn, student)) == 20
    assert violations(conn) == {}


def test_upgrade_moves_to_another_trainer_when_the_first_is_busy(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    first = f.trainer(conn, name="First", rating=4.9)
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    # Someone else books the first trainer for the days right after the schedule.
    last = sessions_of(conn, student)[-1]
    other = f.student(conn, name="Other")
    with conn.transaction():  # another purchase, written without triggers (test set-up)
        conn.execute("SET LOCAL session_replication_role = replica")
        payment = f.payment(conn, other, course, GOOD)
        purchase = one(
            conn,
            """INSERT INTO student_course_purchases (payment_id, student_id,
            course_id, purchase_tier, start_date, preferred_time_slot, schedule_mode,
            session_duration_minutes) VALUES (%s, %s, %s, 30, %s, '16:00', 'daily', 60)
            RETURNING id""",
            payment,
            other,
            course,
            last["scheduled_date"],
        )["id"]
        blocking = one(
            conn,
            """INSERT INTO trainer_allocations (purchase_id, student_id,
            course_id, trainer_id, status, first_session_date, allocated_at)
            VALUES (%s, %s, %s, %s, 'approved', %s, now()) RETURNING id""",
            purchase,
            other,
            course,
            first,
            last["scheduled_date"],
        )["id"]
        conn.execute(
            """INSERT INTO tutoring_sessions (allocation_id, session_number,
            student_id, trainer_id, course_id, scheduled_date, scheduled_time, starts_at,
            ends_at, duration_minutes) SELECT %s, n, %s, %s, %s, %s::date + n, '16:00',
            %s + n * interval '1 day', %s + n * interval '1 day' + interval '1 hour', 60
            FROM generate_series(1, 30) n""",
            (
                blocking,
                other,
                first,
                course,
                last["scheduled_date"],
                last["starts_at"],
                last["starts_at"],
            ),
        )
    second = f.trainer(conn, name="Second", rating=3.0)
    f.payment(conn, student, course, {"sessionCount": 20, "upgrade": True})
    drain(db_url)
    live = one(
        conn,
        "SELECT * FROM trainer_allocations WHERE status = 'approved' AND student_id = %s",
        student,
    )
    assert live["trainer_id"] == second
    # One trainer at a time: the first cannot take the extra sessions, so the whole future
    # of the schedule (here all of it) moves to a trainer who can; numbering continues.
    mine = sessions_of(conn, student)
    assert [r["session_number"] for r in mine] == list(range(1, 21))
    assert {r["trainer_id"] for r in mine} == {second}
    old = one(
        conn,
        "SELECT status, reason FROM trainer_allocations WHERE student_id = %s AND trainer_id = %s",
        student,
        first,
    )
    assert (old["status"], old["reason"]) == ("cancelled", "reassigned")
    assert violations(conn) == {}


def test_upgrade_without_a_purchase_is_rejected(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    student = f.student(conn)
    payment = f.payment(conn, student, course, {"sessionCount": 20, "upgrade": True})
    drain(db_url)
    assert (
        one(conn, "SELECT reason FROM rejected_payments WHERE payment_id = %s", payment)["reason"]
        == "no_purchase_to_upgrade"
    )


def test_refund_cancels_future_sessions_and_frees_capacity(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    trainer = f.trainer(conn, rating=None, slot=("06:00", "23:00"))  # capacity 4
    students = [f.student(conn, name=f"s{i}") for i in range(5)]
    payments = {}
    for hour, student in zip(range(8, 13), students, strict=True):
        payments[student] = f.payment(conn, student, course, {**GOOD, "timeSlot": f"{hour}:00"})
        drain(db_url)
    waiting = students[4]
    assert (
        one(conn, "SELECT reason FROM trainer_allocations WHERE student_id = %s", waiting)["reason"]
        == "at_capacity"
    )

    refunded = students[0]
    # Two of its sessions are in the past: they stay as they were.
    conn.execute(
        "UPDATE tutoring_sessions SET starts_at = starts_at - interval '30 days', "
        "ends_at = ends_at - interval '30 days' WHERE student_id = %s "
        "AND session_number <= 2",
        (refunded,),
    )
    conn.execute("UPDATE payments SET status = 'refunded' WHERE id = %s", (payments[refunded],))
    assert (
        one(conn, "SELECT is_active FROM student_course_purchases WHERE student_id = %s", refunded)[
            "is_active"
        ]
        is False
    )
    allocation = one(
        conn, "SELECT status, reason FROM trainer_allocations WHERE student_id = %s", refunded
    )
    assert (allocation["status"], allocation["reason"]) == ("cancelled", "refunded")
    assert len(sessions_of(conn, refunded)) == 2
    assert len(sessions_of(conn, refunded, "cancelled")) == 8

    drain(db_url)  # the freed capacity went to the waiting purchase
    assert (
        one(
            conn,
            "SELECT trainer_id FROM trainer_allocations WHERE student_id = %s "
            "AND status = 'approved'",
            waiting,
        )["trainer_id"]
        == trainer
    )
    assert one(conn, "SELECT count(*) AS n FROM stage_history WHERE event = 'refunded'")["n"] == 1


def test_healing_restores_missing_stages_without_duplicates(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    # Damage: lost sessions and a lost job, as if a worker crashed with an old system.
    conn.execute("DELETE FROM tutoring_sessions WHERE session_number > 6")
    lonely = f.student(conn, name="Lonely")
    with conn.transaction():
        conn.execute("ALTER TABLE payments DISABLE TRIGGER payments_enqueue_purchase")
        orphan = f.payment(conn, lonely, course, {**GOOD, "timeSlot": "9 AM"})
        conn.execute("ALTER TABLE payments ENABLE TRIGGER payments_enqueue_purchase")
    with conn.transaction():  # backdate everything (the touch trigger would undo it)
        conn.execute("ALTER TABLE payments DISABLE TRIGGER payments_touch")
        conn.execute("UPDATE payments SET updated_at = now() - interval '1 hour'")
        conn.execute("ALTER TABLE payments ENABLE TRIGGER payments_touch")
    conn.execute("UPDATE student_course_purchases SET created_at = now() - interval '1 hour'")
    conn.execute("UPDATE trainer_allocations SET allocated_at = now() - interval '1 hour'")

    healed = conn.execute(
        "SELECT stage, ref_id FROM heal_pipeline('1 minute') ORDER BY stage"
    ).fetchall()
    assert [(h["stage"], h["ref_id"]) for h in healed] == [
        ("allocation", one(conn, "SELECT id FROM student_course_purchases")["id"]),
        ("purchase", orphan),
    ]
    assert conn.execute("SELECT * FROM heal_pipeline('1 minute')").fetchall() == []  # live
    drain(db_url)
    assert violations(conn) == {}
    mine = sessions_of(conn, student)
    assert [r["session_number"] for r in mine] == list(range(1, 11))
    assert min(r["scheduled_date"] for r in mine) > date.today() - timedelta(days=1)
    assert len(sessions_of(conn, lonely)) == 10
    assert one(conn, "SELECT count(*) AS n FROM healed_rows")["n"] == 2
    drain(db_url)
    assert conn.execute("SELECT * FROM heal_pipeline('0 seconds')").fetchall() == []
