"""The three stages through the real triggers and a real pgqueuer worker (in-process)."""

from __future__ import annotations

from datetime import time, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import drain, one, run_one
from workers.stages.contract import Stage

Conn = psycopg.Connection[DictRow]

GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}


def world(conn: Conn) -> tuple[UUID, UUID, UUID]:
    course = f.course(conn)
    student = f.student(conn)
    trainer = f.trainer(conn)
    return course, student, trainer


def test_payment_becomes_purchase_allocation_and_sessions(conn: Conn, db_url: str) -> None:
    course, student, trainer = world(conn)
    payment = f.payment(conn, student, course, GOOD)
    drain(db_url)

    purchase = one(conn, "SELECT * FROM student_course_purchases WHERE payment_id = %s", payment)
    assert (purchase["purchase_tier"], purchase["schedule_mode"]) == (10, "daily")
    assert purchase["preferred_time_slot"] == time(16)
    allocation = one(
        conn, "SELECT * FROM trainer_allocations WHERE purchase_id = %s", purchase["id"]
    )
    assert (allocation["status"], allocation["trainer_id"]) == ("approved", trainer)
    assert allocation["metadata"]["startDate"] == purchase["start_date"].isoformat()
    assert allocation["metadata"]["schedule"]["timeSlot"] == "16:00"
    assert allocation["metadata"]["match"]["chosen"]["trainerId"] == str(trainer)

    sessions = conn.execute(
        "SELECT * FROM tutoring_sessions WHERE allocation_id = %s ORDER BY session_number",
        (allocation["id"],),
    ).fetchall()
    assert [s["session_number"] for s in sessions] == list(range(1, 11))
    assert all(s["scheduled_time"] == time(16) and s["trainer_id"] == trainer for s in sessions)
    assert sessions[0]["scheduled_date"] == purchase["start_date"]
    # 16:00 in Asia/Kolkata is 10:30 UTC.
    assert all(s["starts_at"].astimezone().utcoffset() is not None for s in sessions)
    assert {(s["starts_at"].hour, s["starts_at"].minute) for s in sessions} == {(10, 30)}

    events = conn.execute("SELECT stage, event FROM stage_history ORDER BY id").fetchall()
    assert [(e["stage"], e["event"]) for e in events if e["event"] == "succeeded"] == [
        ("purchase", "succeeded"),
        ("allocation", "succeeded"),
        ("sessions", "succeeded"),
    ]
    assert f.queued_jobs(conn) == []


def test_old_system_queries_run_unchanged(conn: Conn, db_url: str) -> None:
    course, student, trainer = world(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    rows = conn.execute(
        "SELECT id, student_id, course_id, purchase_tier, created_at FROM "
        "student_course_purchases WHERE student_id = %s AND course_id = %s AND is_active = true;",
        (student, course),
    ).fetchall()
    assert len(rows) == 1 and rows[0]["purchase_tier"] == 10
    rows = conn.execute(
        "SELECT id, student_id, course_id, trainer_id, status, created_at FROM "
        "trainer_allocations WHERE student_id = %s AND course_id = %s;",
        (student, course),
    ).fetchall()
    assert [(r["trainer_id"], r["status"]) for r in rows] == [(trainer, "approved")]
    rows = conn.execute(
        "SELECT id, student_id, trainer_id, course_id, metadata FROM trainer_allocations;"
    ).fetchall()
    assert len(rows) == 1 and "startDate" in rows[0]["metadata"]


def test_every_stage_twice_duplicates_nothing(conn: Conn, db_url: str) -> None:
    course, student, _ = world(conn)
    payment = f.payment(conn, student, course, GOOD)
    drain(db_url)
    purchase = one(conn, "SELECT id FROM student_course_purchases")["id"]
    allocation = one(conn, "SELECT id FROM trainer_allocations")["id"]

    assert run_one(db_url, Stage.PURCHASE, payment).event == "skipped"
    assert run_one(db_url, Stage.ALLOCATION, purchase).event == "skipped"
    assert run_one(db_url, Stage.SESSIONS, allocation).event == "skipped"
    # A duplicate notification/enqueue for every row, then a full drain again.
    for stage, ref in (("purchase", payment), ("allocation", purchase), ("sessions", allocation)):
        conn.execute("SELECT enqueue_stage(%s, %s)", (stage, ref))
    drain(db_url)

    counts = one(
        conn,
        """SELECT (SELECT count(*) FROM student_course_purchases) AS purchases,
                                 (SELECT count(*) FROM trainer_allocations) AS allocations,
                                 (SELECT count(*) FROM tutoring_sessions) AS sessions""",
    )
    assert dict(counts) == {"purchases": 1, "allocations": 1, "sessions": 10}


def test_sessions_stage_fills_only_what_is_missing(conn: Conn, db_url: str) -> None:
    course, student, _ = world(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    allocation = one(conn, "SELECT id FROM trainer_allocations")["id"]
    conn.execute("DELETE FROM tutoring_sessions WHERE session_number > 7")
    outcome = run_one(db_url, Stage.SESSIONS, allocation)
    assert outcome.detail == "3 sessions written: numbers 8..10 of 10"
    numbers = [
        r["session_number"]
        for r in conn.execute("SELECT session_number FROM tutoring_sessions ORDER BY 1").fetchall()
    ]
    assert numbers == list(range(1, 11))


def test_rolled_back_payment_enqueues_nothing(conn: Conn) -> None:
    course, student, _ = world(conn)
    with pytest.raises(RuntimeError), conn.transaction():
        f.payment(conn, student, course, GOOD)
        assert len(f.queued_jobs(conn)) == 1  # inside the transaction the job exists...
        raise RuntimeError("payment service crashed before commit")
    assert f.queued_jobs(conn) == []  # ...and it went away with the row
    assert one(conn, "SELECT count(*) AS n FROM stage_history")["n"] == 0


def test_only_succeeded_payments_start_the_pipeline(conn: Conn, db_url: str) -> None:
    course, student, _ = world(conn)
    payment = f.payment(conn, student, course, GOOD, status="initiated")
    assert f.queued_jobs(conn) == []
    conn.execute("UPDATE payments SET status = 'succeeded' WHERE id = %s", (payment,))
    assert [j["entrypoint"] for j in f.queued_jobs(conn)] == ["purchase"]
    drain(db_url)
    assert one(conn, "SELECT count(*) AS n FROM tutoring_sessions")["n"] == 10


def test_bad_metadata_is_rejected_recorded_and_replayable(conn: Conn, db_url: str) -> None:
    course, student, _ = world(conn)
    bad = f.payment(conn, student, course, {"sessionCount": 25, "timeSlot": "4:00 PM"})
    good = f.payment(conn, f.student(conn, name="Bela"), course, GOOD)
    drain(db_url)

    rejected = one(conn, "SELECT * FROM rejected_payments WHERE payment_id = %s", bad)
    assert rejected["reason"] == "invalid_metadata"
    assert rejected["errors"] == [
        {"field": "sessionCount", "message": "must be 10, 20 or 30, got 25"}
    ]
    assert (
        one(conn, "SELECT count(*) AS n FROM student_course_purchases WHERE payment_id = %s", bad)[
            "n"
        ]
        == 0
    )
    # The good payment in the same batch went through.
    assert (
        one(conn, "SELECT count(*) AS n FROM student_course_purchases WHERE payment_id = %s", good)[
            "n"
        ]
        == 1
    )
    # Not retried: no job is left for it.
    assert f.queued_jobs(conn) == []

    conn.execute(
        "UPDATE payments SET metadata = metadata || '{\"sessionCount\": 20}' WHERE id = %s", (bad,)
    )
    drain(db_url)
    purchase = one(conn, "SELECT * FROM student_course_purchases WHERE payment_id = %s", bad)
    assert purchase["purchase_tier"] == 20
    assert one(conn, "SELECT count(*) AS n FROM rejected_payments")["n"] == 0
    history = [
        r["event"]
        for r in conn.execute(
            "SELECT event FROM stage_history WHERE ref_id = %s ORDER BY id", (bad,)
        ).fetchall()
    ]
    assert history == ["enqueued", "rejected", "enqueued", "succeeded"]


def test_second_active_purchase_of_same_course_is_rejected(conn: Conn, db_url: str) -> None:
    course, student, _ = world(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    second = f.payment(conn, student, course, GOOD)
    drain(db_url)
    assert (
        one(conn, "SELECT reason FROM rejected_payments WHERE payment_id = %s", second)["reason"]
        == "active_purchase_exists"
    )


def test_no_trainer_means_one_pending_allocation_with_reason(conn: Conn, db_url: str) -> None:
    course = f.course(conn, category="Video Making", subcategory=None, title="Video Making")
    student = f.student(conn)
    f.trainer(conn, specialties=["Robotics"])
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    purchase = one(conn, "SELECT id FROM student_course_purchases")["id"]
    allocation = one(conn, "SELECT * FROM trainer_allocations")
    assert (allocation["status"], allocation["reason"]) == ("pending", "no_specialty")
    assert "Video Making" in allocation["reason_detail"]

    # A retry of the stage updates the same row; it never adds one.
    run_one(db_url, Stage.ALLOCATION, purchase)
    run_one(db_url, Stage.ALLOCATION, purchase)
    rows = conn.execute("SELECT status, attempts FROM trainer_allocations").fetchall()
    assert [(r["status"], r["attempts"]) for r in rows] == [("pending", 3)]

    trainer = f.trainer(conn, specialties=["video making"])  # case-insensitive match
    run_one(db_url, Stage.ALLOCATION, purchase)
    drain(db_url)
    row = one(conn, "SELECT status, trainer_id, reason FROM trainer_allocations")
    assert (row["status"], row["trainer_id"], row["reason"]) == ("approved", trainer, None)
    assert one(conn, "SELECT count(*) AS n FROM tutoring_sessions")["n"] == 10


@pytest.mark.parametrize(
    ("trainer_kwargs", "reason"),
    [
        ({"radius_km": 0.5}, "out_of_range"),
        ({"weekdays": [1, 2, 3, 4, 5]}, "no_free_slot"),
        ({"slot": ("08:00", "12:00")}, "no_free_slot"),
        ({"status": "inactive"}, "no_trainer"),
    ],
)
def test_pending_reasons(
    conn: Conn, db_url: str, trainer_kwargs: dict[str, Any], reason: str
) -> None:
    course = f.course(conn)
    f.trainer(conn, **trainer_kwargs)
    f.payment(conn, f.student(conn), course, GOOD)
    drain(db_url)
    assert one(conn, "SELECT reason FROM trainer_allocations")["reason"] == reason


def test_weekday_schedule_fits_a_weekday_trainer(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    trainer = f.trainer(conn, weekdays=[1, 2, 3, 4, 5])
    f.payment(conn, f.student(conn), course, {**GOOD, "scheduleMode": "weekdays"})
    drain(db_url)
    assert one(conn, "SELECT trainer_id FROM trainer_allocations")["trainer_id"] == trainer
    days = {
        r["d"]
        for r in conn.execute(
            "SELECT extract(isodow FROM scheduled_date)::int AS d FROM tutoring_sessions"
        )
    }
    assert days <= {1, 2, 3, 4, 5}


def test_busy_trainer_is_not_double_booked(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    busy = f.trainer(conn, name="Busy")
    f.payment(conn, f.student(conn), course, GOOD)
    drain(db_url)
    free = f.trainer(conn, name="Free", rating=3.0)
    f.payment(conn, f.student(conn, name="Bela"), course, GOOD)
    drain(db_url)
    trainers = [
        r["trainer_id"]
        for r in conn.execute(
            "SELECT trainer_id FROM trainer_allocations ORDER BY created_at"
        ).fetchall()
    ]
    assert trainers == [busy, free]


def test_database_refuses_overlapping_sessions(conn: Conn, db_url: str) -> None:
    course, student, trainer = world(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    session = one(conn, "SELECT * FROM tutoring_sessions WHERE session_number = 1")
    with pytest.raises(psycopg.errors.ExclusionViolation):
        conn.execute(
            "INSERT INTO tutoring_sessions (allocation_id, session_number, student_id, "
            "trainer_id, course_id, scheduled_date, scheduled_time, starts_at, ends_at, "
            "duration_minutes) VALUES (%s, 99, %s, %s, %s, %s, %s, %s, %s, 60)",
            (
                session["allocation_id"],
                student,
                trainer,
                course,
                session["scheduled_date"],
                session["scheduled_time"],
                session["starts_at"] + timedelta(minutes=30),
                session["starts_at"] + timedelta(minutes=90),
            ),
        )


def test_overlap_rule_allows_back_to_back_other_trainers_and_cancelled(
    conn: Conn, db_url: str
) -> None:
    """The exclusion constraint forbids only a real overlap of one trainer's live sessions."""
    course, student, trainer = world(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    other = f.trainer(conn, name="other")  # after the allocation, which cannot choose it
    first = one(conn, "SELECT * FROM tutoring_sessions WHERE session_number = 1")
    assert first["trainer_id"] == trainer
    insert = (
        "INSERT INTO tutoring_sessions (allocation_id, session_number, student_id, "
        "trainer_id, course_id, scheduled_date, scheduled_time, starts_at, ends_at, "
        "duration_minutes, status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 60, %s)"
    )

    def add(number: int, who: UUID, shift: timedelta, status: str = "scheduled") -> None:
        starts = first["starts_at"] + shift
        conn.execute(
            insert,
            (
                first["allocation_id"],
                number,
                student,
                who,
                course,
                first["scheduled_date"],
                first["scheduled_time"],
                starts,
                starts + timedelta(minutes=60),
                status,
            ),
        )

    add(90, trainer, timedelta(minutes=60))  # starts as the first one ends
    add(91, trainer, timedelta(minutes=-60))  # ends as the first one starts
    add(92, other, timedelta(0))  # same time, another trainer
    add(93, trainer, timedelta(minutes=30), status="cancelled")
    with pytest.raises(psycopg.errors.ExclusionViolation):
        add(94, trainer, timedelta(minutes=59))
    count = one(
        conn,
        "SELECT count(*) AS n FROM tutoring_sessions WHERE session_number >= 90",
    )["n"]
    assert count == 4


def test_database_refuses_allocations_over_capacity(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    trainer = f.trainer(conn, rating=None)  # capacity 4
    conn.execute(
        "INSERT INTO trainers (full_name, base_lat, base_lng, service_radius_km) "
        "VALUES ('x', 0, 0, 1)"
    )
    for i in range(5):
        student = f.student(conn, name=f"s{i}")
        payment = f.payment(conn, student, course, GOOD, status="initiated")
        purchase = one(
            conn,
            """INSERT INTO student_course_purchases (payment_id, student_id,
            course_id, purchase_tier, start_date, preferred_time_slot, schedule_mode,
            session_duration_minutes) VALUES (%s, %s, %s, 10, current_date + 1, '16:00',
            'daily', 60) RETURNING id""",
            payment,
            student,
            course,
        )["id"]
        insert = (
            "INSERT INTO trainer_allocations (purchase_id, student_id, course_id, "
            "trainer_id, status, first_session_date, allocated_at) "
            "VALUES (%s, %s, %s, %s, 'approved', current_date + 1, now())"
        )
        if i < 4:
            conn.execute(insert, (purchase, student, course, trainer))
        else:
            with pytest.raises(psycopg.errors.CheckViolation, match="at capacity"):
                conn.execute(insert, (purchase, student, course, trainer))
