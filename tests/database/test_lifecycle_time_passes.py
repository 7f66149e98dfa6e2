"""Time passing, through the real triggers and an in-process pgqueuer worker: courses that end,
cancelled sessions and their make-ups, trainers who leave or change, reschedules.

"Time passes" is simulated by moving sessions into the past (tests.helpers.move_into_past).
"""

from __future__ import annotations

from datetime import date, time, timedelta
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import (
    allocation_of,
    drain,
    full_trainer,
    move_into_past,
    one,
    run_periodic,
    worker_settings,
)
from tests.invariants import violations
from workers.ops import commands as ops
from workers.stages import lifecycle

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}


def sessions_of(conn: Conn, student: UUID, *statuses: str) -> list[DictRow]:
    return conn.execute(
        "SELECT * FROM tutoring_sessions WHERE student_id = %s AND status = ANY(%s) "
        "ORDER BY starts_at, session_number",
        (student, list(statuses or ["scheduled"])),
    ).fetchall()


def purchase_of(conn: Conn, student: UUID) -> DictRow:
    return one(
        conn,
        "SELECT * FROM student_course_purchases WHERE student_id = %s "
        "ORDER BY created_at DESC LIMIT 1",
        student,
    )


def complete(conn: Conn, grace: str = "1 hour", limit: int = 2000) -> tuple[int, int]:
    row = one(conn, "SELECT * FROM complete_finished(%s::interval, %s)", grace, limit)
    return row["sessions_completed"], row["courses_completed"]


def history(conn: Conn, ref: UUID, *events: str) -> list[str]:
    return [
        r["detail"]
        for r in conn.execute(
            "SELECT detail FROM stage_history WHERE ref_id = %s AND event = ANY(%s) ORDER BY id",
            (ref, list(events)),
        )
    ]


def enrolled(conn: Conn, db_url: str, *, trainers: int = 1, **metadata: object) -> UUID:
    """A course, `trainers` trainers (the first rated best) and one student with a purchase
    scheduled in full; returns the student."""
    course = f.course(conn)
    for i in range(trainers):
        f.trainer(conn, name=f"T{i}", rating=4.9 - i)
    student = f.student(conn)
    f.payment(conn, student, course, {**GOOD, **metadata})
    drain(db_url)
    return student


# --- completion ---------------------------------------------------------------------------


def test_a_course_ends_frees_its_trainer_and_can_be_bought_again(conn: Conn, db_url: str) -> None:
    course, trainer, students = full_trainer(conn, db_url, GOOD)
    waiting = students[4]
    assert allocation_of(conn, waiting)["reason"] == "at_capacity"

    done, half = students[0], students[1]
    move_into_past(conn, 20, "student_id = %s", done)
    move_into_past(conn, 20, "student_id = %s AND session_number <= 5", half)
    missed = sessions_of(conn, done)[1]
    conn.execute("UPDATE tutoring_sessions SET status = 'missed' WHERE id = %s", (missed["id"],))

    assert complete(conn) == (9 + 5, 1)
    finished = purchase_of(conn, done)
    assert finished["is_active"] is False
    assert finished["completed_at"] is not None
    assert finished["deactivated_at"] == finished["completed_at"]
    statuses = [s["status"] for s in sessions_of(conn, done, "completed", "missed")]
    assert sorted(statuses) == ["completed"] * 9 + ["missed"]
    assert (
        one(conn, "SELECT status FROM trainer_allocations WHERE student_id = %s", done)["status"]
        == "completed"
    )
    assert purchase_of(conn, half)["is_active"] is True  # five sessions are still ahead
    [detail] = history(conn, finished["id"], "completed")
    assert detail.startswith("course finished: 9 sessions completed, 1 missed, 0 cancelled")
    trace = one(conn, "SELECT * FROM purchase_trace WHERE purchase_id = %s", finished["id"])
    assert (trace["sessions_completed"], trace["sessions_missed"]) == (9, 1)
    assert trace["completed_at"] == finished["completed_at"]

    assert complete(conn) == (0, 0)  # idempotent
    drain(db_url)  # the completed allocation freed the trainer: the waiting purchase gets it
    assert allocation_of(conn, waiting)["trainer_id"] == trainer

    f.payment(conn, done, course, {**GOOD, "timeSlot": "8:00"})  # the same course, again
    drain(db_url)
    again = purchase_of(conn, done)
    assert again["id"] != finished["id"] and again["is_active"] is True
    assert conn.execute("SELECT * FROM rejected_payments").fetchall() == []
    assert violations(conn) == {}


def test_the_minute_job_completes_what_ended(conn: Conn, db_url: str) -> None:
    student = enrolled(conn, db_url)
    move_into_past(conn, 20)
    assert run_periodic(db_url, lifecycle.complete) == {
        "sessions_completed": 10,
        "courses_completed": 1,
    }
    assert purchase_of(conn, student)["completed_at"] is not None
    assert "courses completed 24h: 1" in ops.status(conn, worker_settings(db_url))


def test_completion_is_bounded_and_waits_for_the_grace_period(conn: Conn, db_url: str) -> None:
    student = enrolled(conn, db_url)
    move_into_past(conn, 20, "session_number <= 4")
    move_into_past(conn, 0, "session_number = 5")
    conn.execute(  # session 5 ended ten minutes ago
        "UPDATE tutoring_sessions SET starts_at = now() - interval '70 minutes', "
        "ends_at = now() - interval '10 minutes' WHERE session_number = 5"
    )
    assert complete(conn, limit=3) == (3, 0)
    assert complete(conn) == (1, 0)  # the fourth; session 5 is within the hour of grace
    assert complete(conn, grace="0 seconds") == (1, 0)
    assert len(sessions_of(conn, student, "completed")) == 5


def test_a_course_short_of_a_makeup_does_not_finish(conn: Conn, db_url: str) -> None:
    student = enrolled(conn, db_url)
    move_into_past(conn, 20)
    conn.execute("UPDATE tutoring_sessions SET status = 'cancelled' WHERE session_number = 10")
    assert complete(conn) == (9, 0)  # one session is owed: not finished
    drain(db_url)  # the make-up, after the last session
    [makeup] = sessions_of(conn, student)
    assert makeup["session_number"] == 11
    move_into_past(conn, 2, "id = %s", makeup["id"])
    assert complete(conn) == (1, 1)
    assert violations(conn) == {}


def test_session_status_changes_the_database_refuses(conn: Conn, db_url: str) -> None:
    enrolled(conn, db_url)
    move_into_past(conn, 20, "session_number = 1")
    update = "UPDATE tutoring_sessions SET status = %s WHERE session_number = %s"
    with pytest.raises(psycopg.errors.CheckViolation, match="once it has started"):
        conn.execute(update, ("missed", 2))
    with pytest.raises(psycopg.errors.CheckViolation, match="once it has started"):
        conn.execute(update, ("completed", 2))
    conn.execute(update, ("completed", 1))
    conn.execute(update, ("missed", 1))  # attendance corrected
    with pytest.raises(psycopg.errors.CheckViolation, match="cannot become scheduled"):
        conn.execute(update, ("scheduled", 1))
    conn.execute(update, ("cancelled", 3))
    assert one(conn, "SELECT cancelled_at FROM tutoring_sessions WHERE session_number = 3")[
        "cancelled_at"
    ]
    with pytest.raises(psycopg.errors.CheckViolation, match="stays cancelled"):
        conn.execute(update, ("scheduled", 3))


# --- cancellations and make-ups -------------------------------------------------------------


def test_cancelled_sessions_get_makeups_and_a_no_show_does_not(conn: Conn, db_url: str) -> None:
    student = enrolled(conn, db_url)
    trainer = allocation_of(conn, student)["trainer_id"]
    purchase = purchase_of(conn, student)["id"]
    move_into_past(conn, 3, "session_number <= 2")
    last_day = sessions_of(conn, student)[-1]["scheduled_date"]

    conn.execute("UPDATE tutoring_sessions SET status = 'cancelled' WHERE session_number = 4")
    assert history(conn, purchase, "makeup") == ["session(s) 4 cancelled"]
    drain(db_url)
    mine = sessions_of(conn, student)
    assert len(mine) == 10
    assert (mine[-1]["session_number"], mine[-1]["scheduled_date"]) == (11, last_day + timedelta(1))
    assert {s["trainer_id"] for s in mine} == {trainer}
    assert mine[-1]["scheduled_time"] == time(16)

    # The last session cancelled: its make-up comes after it and takes a new number.
    conn.execute("UPDATE tutoring_sessions SET status = 'cancelled' WHERE session_number = 11")
    drain(db_url)
    mine = sessions_of(conn, student)
    assert (mine[-1]["session_number"], mine[-1]["scheduled_date"]) == (12, last_day + timedelta(2))

    # A no-show is a delivered session: no make-up, nothing enqueued.
    conn.execute("UPDATE tutoring_sessions SET status = 'missed' WHERE session_number = 1")
    assert f.queued_jobs(conn) == []
    assert len(sessions_of(conn, student, "scheduled", "missed")) == 10
    assert violations(conn) == {}
    assert one(conn, "SELECT count(*) AS n FROM trainer_allocations")["n"] == 1


def test_hybrid_makeups_follow_the_delivery_of_their_number(conn: Conn, db_url: str) -> None:
    student = enrolled(conn, db_url, sessionCount=30, learningMode="hybrid")
    conn.execute("UPDATE tutoring_sessions SET status = 'cancelled' WHERE session_number = 8")
    drain(db_url)
    conn.execute("UPDATE tutoring_sessions SET status = 'cancelled' WHERE session_number = 9")
    drain(db_url)
    makeups = sessions_of(conn, student)[-2:]
    assert [(s["session_number"], s["delivery"]) for s in makeups] == [
        (31, "online"),
        (32, "home"),
    ]
    assert violations(conn) == {}


def test_a_refund_cancels_sessions_without_makeups(conn: Conn, db_url: str) -> None:
    student = enrolled(conn, db_url)
    payment = one(conn, "SELECT payment_id FROM student_course_purchases")["payment_id"]
    conn.execute("UPDATE payments SET status = 'refunded' WHERE id = %s", (payment,))
    assert f.queued_jobs(conn) == []
    assert len(sessions_of(conn, student, "cancelled")) == 10


# --- trainers who leave or change -----------------------------------------------------------

CHANGES = {
    "inactive": "UPDATE trainers SET status = 'inactive' WHERE id = %(t)s",
    "no_specialty": "UPDATE trainers SET specialties = '{Coding}' WHERE id = %(t)s",
    "out_of_range": "UPDATE trainers SET service_radius_km = 0.5 WHERE id = %(t)s",
    "unavailable": "DELETE FROM trainer_availability WHERE trainer_id = %(t)s AND weekday = "
    "(SELECT extract(isodow FROM max(scheduled_date)) FROM tutoring_sessions)",
}


@pytest.mark.parametrize("why", sorted(CHANGES))
def test_a_trainer_who_cannot_teach_any_more_hands_over_what_is_ahead(
    conn: Conn, db_url: str, why: str
) -> None:
    student = enrolled(conn, db_url, trainers=2)
    first = allocation_of(conn, student)
    move_into_past(conn, 5, "session_number <= 3")
    conn.execute(CHANGES[why], {"t": first["trainer_id"]})
    purchase = purchase_of(conn, student)["id"]
    assert len(history(conn, purchase, "trainer_changed")) == 1
    drain(db_url)

    old = one(conn, "SELECT * FROM trainer_allocations WHERE id = %s", first["id"])
    assert (old["status"], old["reason"]) == ("cancelled", "trainer_left")
    assert old["metadata"]["ended"]["reason"] == "trainer_left"
    new = allocation_of(conn, student)
    assert new["status"] == "approved" and new["trainer_id"] != first["trainer_id"]
    assert new["metadata"]["trainerChange"]["why"] == why
    mine = sessions_of(conn, student)
    assert [s["session_number"] for s in mine] == list(range(1, 11))
    assert [s["trainer_id"] for s in mine] == [first["trainer_id"]] * 3 + [new["trainer_id"]] * 7
    trace = one(conn, "SELECT * FROM purchase_trace WHERE purchase_id = %s", purchase)
    assert trace["last_change"] == "trainer_left"
    assert trace["trainer_id"] == new["trainer_id"]
    assert violations(conn) == {}


def test_a_trainer_who_left_with_nobody_to_take_over_leaves_a_visible_wait(
    conn: Conn, db_url: str
) -> None:
    student = enrolled(conn, db_url)
    move_into_past(conn, 5, "session_number <= 3")
    conn.execute("UPDATE trainers SET status = 'inactive'")
    drain(db_url)
    waiting = allocation_of(conn, student)
    assert (waiting["status"], waiting["reason"]) == ("pending", "trainer_left")
    assert "can no longer teach this course: the trainer is inactive" in waiting["reason_detail"]
    assert len(sessions_of(conn, student)) == 3  # the past stays
    assert len(sessions_of(conn, student, "cancelled")) == 7

    newcomer = f.trainer(conn, name="Newcomer")  # the trainers trigger retries the wait
    drain(db_url)
    mine = sessions_of(conn, student)
    assert [s["session_number"] for s in mine] == list(range(1, 11))
    assert {s["trainer_id"] for s in mine[3:]} == {newcomer}
    assert mine[3]["scheduled_date"] > date.today()
    assert violations(conn) == {}


def test_changes_that_still_fit_move_nothing(conn: Conn, db_url: str) -> None:
    student = enrolled(conn, db_url, trainers=2)
    before = allocation_of(conn, student)
    trainer = before["trainer_id"]
    conn.execute(
        "UPDATE trainers SET rating = 4.0, service_radius_km = 9 WHERE id = %s", (trainer,)
    )
    assert f.queued_jobs(conn) == []
    with conn.transaction():  # availability replaced as a whole, the app's usual way
        conn.execute("DELETE FROM trainer_availability WHERE trainer_id = %s", (trainer,))
        for day in range(1, 8):
            conn.execute(
                "INSERT INTO trainer_availability VALUES (%s, %s, '07:00', '21:00')", (trainer, day)
            )
    drain(db_url)
    assert allocation_of(conn, student)["id"] == before["id"]
    assert sessions_of(conn, student, "cancelled") == []


# --- reschedule ------------------------------------------------------------------------------


def reschedule(
    conn: Conn, student: UUID, slot: str | None, start: date | None = None, mode: str | None = None
) -> int:
    purchase = purchase_of(conn, student)["id"]
    return int(
        one(conn, "SELECT reschedule(%s, %s, %s, %s) AS r", purchase, slot, start, mode)["r"]
    )


def test_reschedule_keeps_the_trainer_when_free(conn: Conn, db_url: str) -> None:
    student = enrolled(conn, db_url, trainers=2)
    trainer = allocation_of(conn, student)["trainer_id"]
    move_into_past(conn, 5, "session_number <= 3")
    request = reschedule(conn, student, "7 PM")
    drain(db_url)
    mine = sessions_of(conn, student)
    assert [s["session_number"] for s in mine] == list(range(1, 11))
    assert [s["scheduled_time"] for s in mine] == [time(16)] * 3 + [time(19)] * 7
    assert {s["trainer_id"] for s in mine} == {trainer}
    done = one(conn, "SELECT * FROM schedule_changes WHERE id = %s", request)
    assert done["status"] == "done" and "with the same trainer" in done["outcome"]
    assert done["allocation_id"] == allocation_of(conn, student)["id"]
    assert purchase_of(conn, student)["preferred_time_slot"] == time(19)
    assert violations(conn) == {}


def test_reschedule_to_a_slot_the_trainer_cannot_teach(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    early = f.trainer(conn, name="Early", rating=4.9, slot=("08:00", "17:00"))
    late = f.trainer(conn, name="Late", rating=3.2, slot=("08:00", "21:00"))
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    assert allocation_of(conn, student)["trainer_id"] == early
    move_into_past(conn, 5, "session_number <= 2")

    reschedule(conn, student, "19:00")
    drain(db_url)
    mine = sessions_of(conn, student)
    assert [(s["trainer_id"], s["scheduled_time"]) for s in mine] == [(early, time(16))] * 2 + [
        (late, time(19))
    ] * 8
    assert [s["session_number"] for s in mine] == list(range(1, 11))
    old = one(conn, "SELECT * FROM trainer_allocations WHERE trainer_id = %s", early)
    assert (old["status"], old["reason"]) == ("cancelled", "rescheduled")
    assert violations(conn) == {}


def test_reschedule_start_date_and_mode(conn: Conn, db_url: str) -> None:
    student = enrolled(conn, db_url)
    start = date.today() + timedelta(days=10)
    reschedule(conn, student, None, start, "Weekdays")
    drain(db_url)
    mine = sessions_of(conn, student)
    assert len(mine) == 10
    assert min(s["scheduled_date"] for s in mine) >= start
    assert {s["scheduled_date"].isoweekday() for s in mine} <= {1, 2, 3, 4, 5}
    assert purchase_of(conn, student)["schedule_mode"] == "weekdays"


def test_reschedule_nobody_can_teach_waits_visibly(conn: Conn, db_url: str) -> None:
    student = enrolled(conn, db_url)
    request = reschedule(conn, student, "6 AM")  # every trainer starts at 08:00
    drain(db_url)
    waiting = allocation_of(conn, student)
    assert (waiting["status"], waiting["reason"]) == ("pending", "no_free_slot")
    assert sessions_of(conn, student) == []
    outcome = one(conn, "SELECT outcome FROM schedule_changes WHERE id = %s", request)["outcome"]
    assert "pending (no_free_slot)" in outcome
    assert violations(conn) == {}


def state(conn: Conn) -> list[object]:
    return [
        conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
        for table in (
            "student_course_purchases",
            "trainer_allocations",
            "tutoring_sessions",
            "schedule_changes",
            "pgqueuer",
        )
    ]


@pytest.mark.parametrize(
    ("slot", "start", "mode", "message"),
    [
        ("25:00", None, None, "the hour must be 0..23"),
        ("teatime", None, None, "is not a time like"),
        ("16", None, None, "a 24-hour time needs minutes"),
        ("11:30 PM", None, None, "would end after midnight"),
        (None, date.today() - timedelta(days=2), None, "is in the past"),
        (None, None, "weekly", "is not one of daily, weekdays, sunday_only"),
        (None, None, None, "nothing to change"),
        ("4:00 PM", None, "daily", "nothing changes"),
    ],
)
def test_reschedule_refuses_bad_input_and_changes_nothing(
    conn: Conn, db_url: str, slot: str | None, start: date | None, mode: str | None, message: str
) -> None:
    student = enrolled(conn, db_url)
    before = state(conn)
    with pytest.raises(psycopg.Error, match=message):
        reschedule(conn, student, slot, start, mode)
    assert state(conn) == before


def test_reschedule_refuses_purchases_that_are_not_active(conn: Conn, db_url: str) -> None:
    with pytest.raises(psycopg.errors.NoDataFound, match="no purchase"):
        conn.execute("SELECT reschedule(gen_random_uuid(), '4 PM')")
    student = enrolled(conn, db_url)
    move_into_past(conn, 20)
    complete(conn)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="is finished"):
        reschedule(conn, student, "5 PM")
    other = f.student(conn, name="Other")
    course = one(conn, "SELECT id FROM courses")["id"]
    payment = f.payment(conn, other, course, GOOD)
    drain(db_url)
    conn.execute("UPDATE payments SET status = 'refunded' WHERE id = %s", (payment,))
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not active"):
        reschedule(conn, other, "5 PM")


def test_the_sweep_catches_what_no_trigger_enqueued(conn: Conn, db_url: str) -> None:
    """An enqueue swallowed by a running job (or a write with triggers off) is found later."""
    student = enrolled(conn, db_url, trainers=2)
    old = allocation_of(conn, student)
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("UPDATE trainers SET status = 'inactive' WHERE id = %s", (old["trainer_id"],))
    request = reschedule(conn, student, "6 PM")
    conn.execute("DELETE FROM pgqueuer")  # as if a running job had absorbed the enqueue
    conn.execute("UPDATE schedule_changes SET requested_at = now() - interval '2 minutes'")
    assert "unfit allocations: 1" in ops.status(conn, worker_settings(db_url))

    assert run_periodic(db_url, lifecycle.sweep) == 1
    assert run_periodic(db_url, lifecycle.sweep) == 0  # a live job exists now
    drain(db_url)
    new = allocation_of(conn, student)
    assert new["trainer_id"] not in (None, old["trainer_id"])
    assert (
        one(conn, "SELECT status FROM schedule_changes WHERE id = %s", request)["status"] == "done"
    )
    assert {s["scheduled_time"] for s in sessions_of(conn, student)} == {time(18)}
    assert run_periodic(db_url, lifecycle.sweep) == 0
    assert violations(conn) == {}


def test_a_change_while_the_allocation_job_runs_is_carried_out_after_it(
    conn: Conn, db_url: str
) -> None:
    """enqueue_stage dedupes onto the row's live job; when that job is already running it may
    have read the row before the change, so the stage runs once more after it (0011)."""
    student = enrolled(conn, db_url)
    purchase = purchase_of(conn, student)["id"]
    # The allocation job for this purchase is running (as a worker's claim marks it) ...
    job = one(conn, "SELECT enqueue_stage('allocation', %s) AS id", purchase)["id"]
    conn.execute("UPDATE pgqueuer SET status = 'picked' WHERE id = %s", (job,))
    # ... when a session is cancelled: the make-up's enqueue lands on the running job.
    conn.execute("UPDATE tutoring_sessions SET status = 'cancelled' WHERE session_number = 4")
    assert one(conn, "SELECT enqueue_stage('allocation', %s) AS id", purchase)["id"] == job
    assert conn.execute("SELECT stage, ref_id FROM stage_followups").fetchall() == [
        {"stage": "allocation", "ref_id": purchase}
    ]
    # The running job finishes without having seen the cancellation (pgqueuer deletes it).
    conn.execute("DELETE FROM pgqueuer WHERE id = %s", (job,))
    assert [(j["entrypoint"], j["status"]) for j in f.queued_jobs(conn)] == [
        ("allocation", "queued")
    ]
    assert conn.execute("SELECT * FROM stage_followups").fetchall() == []
    drain(db_url)
    assert len(sessions_of(conn, student)) == 10
    assert sessions_of(conn, student)[-1]["session_number"] == 11
