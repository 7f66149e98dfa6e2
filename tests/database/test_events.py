"""Business events (migration 0017), in the database: every event type checked field by field
against the app's list (issue 23, kc-backend shared/events/types.ts), written in the
transaction of the change whoever makes it, once per change, and read in commit order."""

from __future__ import annotations

import json
import secrets
import threading
from datetime import UTC, datetime, time, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.rows import DictRow, dict_row

from tests import factories as f
from tests.console_world import add_operator
from tests.helpers import allocation_of, drain, move_into_past, one, run_one
from workers.events.shapes import BASE_FIELDS, event_id, own_fields, parse_event
from workers.stages.contract import Stage

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "5:00 PM", "scheduleMode": "weekdays"}

# The list of each type's own fields (from the app's types.ts), in its order.
APP_FIELDS = {
    "PURCHASE_CREATED": ("purchaseId", "studentId", "courseId", "purchaseTier"),
    "COURSE_ACCESS_GRANTED": ("purchaseId", "studentId", "courseId", "purchaseTier"),
    "TRAINER_ALLOCATED": (
        "allocationId",
        "trainerId",
        "studentId",
        "courseId",
        "sessionCount",
        "startDate",
        "endDate",
    ),
    "SESSIONS_GENERATED": (
        "allocationId",
        "trainerId",
        "studentId",
        "courseId",
        "sessionCount",
        "sessionIds",
        "startDate",
    ),
    "STUDENT_DEALLOCATED": (
        "allocationId",
        "trainerId",
        "studentId",
        "courseId",
        "reason",
        "deallocatedAt",
    ),
    "SESSION_RESCHEDULED": (
        "sessionId",
        "oldDate",
        "newDate",
        "oldTimeSlot",
        "newTimeSlot",
        "trainerId",
        "studentId",
    ),
    "SESSION_SUBSTITUTED": (
        "sessionId",
        "originalTrainerId",
        "substituteTrainerId",
        "studentId",
        "date",
        "timeSlot",
    ),
    "SESSION_COMPLETED": (
        "sessionId",
        "trainerId",
        "studentId",
        "courseId",
        "completedAt",
        "duration",
    ),
    "COURSE_PROGRESS_UPDATED": (
        "studentId",
        "courseId",
        "completedSessions",
        "totalSessions",
        "percentage",
        "lastCompletedAt",
    ),
    "COURSE_COMPLETED": (
        "courseId",
        "studentId",
        "completionDate",
        "totalSessions",
        "completedSessions",
    ),
    "ADMIN_OVERRIDE": ("action", "targetId", "targetType", "changes", "reason"),
    "NOTIFICATION_REQUESTED": ("notificationType", "title", "body", "data"),
}


def session_no(conn: Conn, student: UUID, number: int) -> DictRow:
    return one(
        conn,
        "SELECT * FROM tutoring_sessions WHERE student_id = %s AND session_number = %s",
        student,
        number,
    )


def events(
    conn: Conn, purchase: UUID | None = None, kind: str | None = None
) -> list[dict[str, Any]]:
    """The events written, in the order written; each checked against its type's shape: the
    app's base fields, eventId, and exactly the type's own fields."""
    rows = conn.execute(
        "SELECT type, payload, purchase_id FROM business_events "
        "WHERE (%(p)s::uuid IS NULL OR purchase_id = %(p)s) "
        "AND (%(k)s::text IS NULL OR type = %(k)s) ORDER BY seq",
        {"p": purchase, "k": kind},
    ).fetchall()
    out = []
    for row in rows:
        payload = row["payload"]
        parse_event(json.dumps(payload))  # the type's model: every field's type and format
        optional = {"deviceToken"} if row["type"] == "NOTIFICATION_REQUESTED" else set()
        assert set(payload) == set(BASE_FIELDS) | set(APP_FIELDS[row["type"]]), payload
        assert set(own_fields(row["type"])) - optional == set(APP_FIELDS[row["type"]])
        if row["type"] not in ("PURCHASE_CREATED", "COURSE_ACCESS_GRANTED"):
            assert payload["metadata"]["purchaseId"] == str(row["purchase_id"])
        out.append(payload)
    return out


def notes(conn: Conn, purchase: UUID | None = None) -> list[tuple[str, str, str]]:
    """The notifications asked for: (role, userId, title)."""
    return [
        (e["role"], e["userId"], e["title"])
        for e in events(conn, purchase, "NOTIFICATION_REQUESTED")
    ]


def purchase_of(conn: Conn, student: UUID) -> DictRow:
    return one(
        conn,
        "SELECT * FROM student_course_purchases WHERE student_id = %s "
        "ORDER BY created_at DESC LIMIT 1",
        student,
    )


def enrolled(conn: Conn, db_url: str, trainers: int = 1, **meta: object) -> tuple[UUID, UUID]:
    """A course (Robotics with Arduino), trainers T0 (best), T1 ..., and Asha's purchase with
    every session written: (student, purchase)."""
    course = f.course(conn)
    for i in range(trainers):
        f.trainer(conn, name=f"T{i}", rating=4.9 - i / 10)
    student = f.student(conn, name="Asha Rao")
    f.payment(conn, student, course, {**GOOD, **meta})
    drain(db_url)
    return student, purchase_of(conn, student)["id"]


def ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def iso(value: datetime) -> str:
    """As JavaScript's toISOString() writes an instant (milliseconds, UTC)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{value.microsecond // 1000:03d}Z"
    )


# -- the first payment: what the app hears, field by field ------------------------------------


def test_a_payment_becomes_the_apps_events_field_by_field(conn: Conn, db_url: str) -> None:
    student, purchase_id = enrolled(conn, db_url)
    purchase = one(conn, "SELECT * FROM student_course_purchases WHERE id = %s", purchase_id)
    payment = one(conn, "SELECT * FROM payments WHERE id = %s", purchase["payment_id"])
    allocation = allocation_of(conn, student)
    sessions = conn.execute(
        "SELECT * FROM tutoring_sessions WHERE allocation_id = %s ORDER BY session_number",
        (allocation["id"],),
    ).fetchall()
    trainer = one(conn, "SELECT * FROM trainers WHERE id = %s", allocation["trainer_id"])
    got = events(conn)
    assert [e["type"] for e in got] == [
        "PURCHASE_CREATED",
        "COURSE_ACCESS_GRANTED",
        "TRAINER_ALLOCATED",
        "NOTIFICATION_REQUESTED",
        "NOTIFICATION_REQUESTED",
        "SESSIONS_GENERATED",
        "NOTIFICATION_REQUESTED",
    ]
    created, granted, allocated, told, assigned, generated, scheduled = got
    for kind, event in (("PURCHASE_CREATED", created), ("COURSE_ACCESS_GRANTED", granted)):
        assert event == {
            "type": kind,
            "eventId": str(event_id(f"{kind}:{purchase_id}")),
            "timestamp": ms(purchase["created_at"]),
            "userId": str(student),
            "role": "student",
            "purchaseId": str(purchase_id),
            "studentId": str(student),
            "courseId": str(purchase["course_id"]),
            "purchaseTier": 10,
            "metadata": payment["metadata"],  # as the app sent it
        }
    assert allocated == {
        "type": "TRAINER_ALLOCATED",
        "eventId": str(event_id(f"TRAINER_ALLOCATED:{allocation['id']}")),
        "timestamp": ms(allocation["allocated_at"]),
        "userId": str(student),
        "role": "student",
        "metadata": {"purchaseId": str(purchase_id)},
        "allocationId": str(allocation["id"]),
        "trainerId": str(trainer["id"]),
        "studentId": str(student),
        "courseId": str(purchase["course_id"]),
        "sessionCount": 10,
        "startDate": sessions[0]["scheduled_date"].isoformat(),
        "endDate": sessions[-1]["scheduled_date"].isoformat(),
    }
    assert told["role"] == "student" and told["userId"] == str(student)
    assert (told["notificationType"], told["title"]) == ("allocation", "Trainer Assigned")
    assert told["body"] == (
        'Great news! Trainer T0 has been assigned to your course "Robotics with Arduino". '
        "You will receive session details soon."
    )
    assert told["data"] == {
        "trainerName": "T0",
        "courseName": "Robotics with Arduino",
        "type": "trainer_assignment",
        "trainerId": str(trainer["id"]),
        "allocationId": str(allocation["id"]),
        "courseId": str(purchase["course_id"]),
        "purchaseId": str(purchase_id),
    }
    assert (assigned["role"], assigned["userId"], assigned["title"]) == (
        "trainer",
        str(trainer["id"]),
        "New Assignment",
    )
    assert assigned["body"] == (
        'You have been assigned to teach "Robotics with Arduino" for student Asha Rao. '
        "Check your schedule for session details."
    )
    assert generated == {
        "type": "SESSIONS_GENERATED",
        "eventId": str(event_id(f"SESSIONS_GENERATED:{allocation['id']}:{sessions[0]['id']}")),
        "timestamp": ms(sessions[0]["created_at"]),
        "userId": str(student),
        "role": "student",
        "metadata": {"purchaseId": str(purchase_id)},
        "allocationId": str(allocation["id"]),
        "trainerId": str(trainer["id"]),
        "studentId": str(student),
        "courseId": str(purchase["course_id"]),
        "sessionCount": 10,
        "sessionIds": [str(s["id"]) for s in sessions],
        "startDate": sessions[0]["scheduled_date"].isoformat(),
    }
    first = sessions[0]["scheduled_date"]
    assert scheduled["title"] == "Session Scheduled"
    assert scheduled["body"] == (
        f'Your 10 sessions of "Robotics with Arduino" with T0 have been scheduled, starting '
        f"{first:%A}, {first:%B} {first.day}, {first.year} at 5:00 PM. Please be ready!"
    )
    assert scheduled["data"]["scheduledDate"] == first.isoformat()
    assert scheduled["data"]["scheduledTime"] == "5:00 PM"


def test_dates_are_the_students_local_days(conn: Conn, db_url: str) -> None:
    """A student in Los Angeles at 11 PM: the session's local day, not the UTC one."""
    course = f.course(conn)
    f.trainer(conn, slot=("00:00", "24:00"), lat=34.06, lng=-118.25)
    student = f.student(conn, lat=34.05, lng=-118.24, timezone="America/Los_Angeles")
    f.payment(conn, student, course, {"sessionCount": 10, "timeSlot": "11:00 PM"})
    drain(db_url)
    [allocated] = events(conn, kind="TRAINER_ALLOCATED")
    [generated] = events(conn, kind="SESSIONS_GENERATED")
    first = session_no(conn, student, 1)
    assert first["starts_at"].astimezone(UTC).date() == first["scheduled_date"] + timedelta(days=1)
    assert allocated["startDate"] == generated["startDate"] == first["scheduled_date"].isoformat()


# -- once per change ---------------------------------------------------------------------------


def test_a_replayed_stage_writes_no_new_event(conn: Conn, db_url: str) -> None:
    student, purchase = enrolled(conn, db_url)
    before = events(conn)
    allocation = allocation_of(conn, student)
    payment = purchase_of(conn, student)["payment_id"]
    for stage, ref in (
        (Stage.PURCHASE, payment),
        (Stage.ALLOCATION, purchase),
        (Stage.SESSIONS, allocation["id"]),
    ):
        run_one(db_url, stage, ref)
        conn.execute("SELECT replay_stage(%s, %s)", (stage.value, ref))
    drain(db_url)
    assert events(conn) == before


def test_a_pending_purchase_is_told_once_whatever_the_retries(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn, specialties=["Painting"])
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    purchase = purchase_of(conn, student)["id"]
    for _ in range(3):
        conn.execute("SELECT replay_stage('allocation', %s)", (purchase,))
        drain(db_url)
    assert allocation_of(conn, student)["attempts"] == 4
    [waiting] = events(conn, purchase, "NOTIFICATION_REQUESTED")
    assert (waiting["title"], waiting["userId"]) == ("Finding Your Trainer", str(student))
    assert waiting["data"]["reason"] == "no_specialty"
    assert waiting["body"] == (
        'We are finding a trainer for your course "Robotics with Arduino". We will let you '
        "know as soon as one is assigned."
    )
    f.trainer(conn, name="Arrives")  # the trainers trigger retries the wait: approved
    drain(db_url)
    assert [t for _, _, t in notes(conn, purchase)] == [
        "Finding Your Trainer",
        "Trainer Assigned",
        "New Assignment",
        "Session Scheduled",
    ]


def test_a_rolled_back_change_writes_nothing(conn: Conn, db_url: str) -> None:
    student, _ = enrolled(conn, db_url)
    before = events(conn)
    last = _feed(conn)[-1][0]
    with pytest.raises(RuntimeError), conn.transaction():
        conn.execute("UPDATE payments SET status = 'refunded'")  # a refund, rolled back
        assert len(events(conn)) > len(before)  # written in its transaction ...
        raise RuntimeError("roll back")
    assert events(conn) == before  # ... and gone with it
    assert _feed(conn, last) == []
    assert allocation_of(conn, student)["status"] == "approved"


# -- over time: every other event type --------------------------------------------------------


def test_completion_progress_and_course_completed(conn: Conn, db_url: str) -> None:
    student, purchase = enrolled(conn, db_url)
    move_into_past(conn, 20)
    missed = session_no(conn, student, 2)
    conn.execute("UPDATE tutoring_sessions SET status = 'missed' WHERE id = %s", (missed["id"],))
    [progress_missed] = events(conn, purchase, "COURSE_PROGRESS_UPDATED")
    assert (progress_missed["completedSessions"], progress_missed["percentage"]) == (1, 10)
    conn.execute("SELECT * FROM complete_finished()")
    sessions = conn.execute(
        "SELECT * FROM tutoring_sessions WHERE student_id = %s AND status = 'completed' "
        "ORDER BY id",
        (student,),
    ).fetchall()
    completed = sorted(events(conn, purchase, "SESSION_COMPLETED"), key=lambda e: e["sessionId"])
    assert len(completed) == 9
    for event, session in zip(completed, sessions, strict=True):
        assert {k: event[k] for k in APP_FIELDS["SESSION_COMPLETED"]} == {
            "sessionId": str(session["id"]),
            "trainerId": str(session["trainer_id"]),
            "studentId": str(student),
            "courseId": str(session["course_id"]),
            "completedAt": iso(session["ends_at"]),
            "duration": 60,
        }
    progress = events(conn, purchase, "COURSE_PROGRESS_UPDATED")
    last_end = max(s["ends_at"] for s in sessions)
    assert {k: progress[-1][k] for k in APP_FIELDS["COURSE_PROGRESS_UPDATED"]} == {
        "studentId": str(student),
        "courseId": str(sessions[0]["course_id"]),
        "completedSessions": 10,  # completed and missed: delivered
        "totalSessions": 10,
        "percentage": 100,
        "lastCompletedAt": iso(last_end),
    }
    pu = purchase_of(conn, student)
    [finished] = events(conn, purchase, "COURSE_COMPLETED")
    local_day = pu["completed_at"].astimezone(__import__("zoneinfo").ZoneInfo("Asia/Kolkata"))
    assert {k: finished[k] for k in APP_FIELDS["COURSE_COMPLETED"]} == {
        "courseId": str(pu["course_id"]),
        "studentId": str(student),
        "completionDate": local_day.date().isoformat(),
        "totalSessions": 10,
        "completedSessions": 10,
    }
    assert notes(conn, purchase)[-1] == ("student", str(student), "Course Completed! 🎓🎉")
    conn.execute("SELECT * FROM complete_finished()")  # nothing more to do: nothing more said
    assert len(events(conn, purchase, "COURSE_COMPLETED")) == 1


def test_a_refund_deallocates_and_tells_both(conn: Conn, db_url: str) -> None:
    student, purchase = enrolled(conn, db_url)
    allocation = allocation_of(conn, student)
    seen = len(events(conn, purchase))
    conn.execute("UPDATE payments SET status = 'refunded'")
    after = events(conn, purchase)[seen:]
    assert [e["type"] for e in after] == [
        "STUDENT_DEALLOCATED",
        "NOTIFICATION_REQUESTED",
        "NOTIFICATION_REQUESTED",
    ]
    ended = one(conn, "SELECT * FROM trainer_allocations WHERE id = %s", allocation["id"])
    dealloc, unassigned, cancelled = after
    assert {k: dealloc[k] for k in (*APP_FIELDS["STUDENT_DEALLOCATED"], "userId", "role")} == {
        "allocationId": str(allocation["id"]),
        "trainerId": str(allocation["trainer_id"]),
        "studentId": str(student),
        "courseId": str(allocation["course_id"]),
        "reason": "refunded",
        "deallocatedAt": iso(ended["updated_at"]),
        "userId": str(allocation["trainer_id"]),
        "role": "trainer",
    }
    assert (unassigned["userId"], unassigned["title"]) == (
        str(allocation["trainer_id"]),
        "Assignment Ended",
    )
    assert "the course was refunded" in unassigned["body"]
    assert (cancelled["userId"], cancelled["title"]) == (str(student), "Sessions Cancelled")
    assert cancelled["data"]["sessionCount"] == 10
    assert cancelled["body"].endswith("The payment was refunded.")


def test_a_cancelled_session_is_told_and_its_makeup_scheduled(conn: Conn, db_url: str) -> None:
    student, purchase = enrolled(conn, db_url)
    third = session_no(conn, student, 3)
    conn.execute("UPDATE tutoring_sessions SET status = 'cancelled' WHERE id = %s", (third["id"],))
    day = third["scheduled_date"]
    cancelled = events(conn, purchase, "NOTIFICATION_REQUESTED")[-1]
    assert cancelled["title"] == "Session Cancelled"
    assert cancelled["body"] == (
        f'Your session of "Robotics with Arduino" on {day:%A}, {day:%B} {day.day}, {day.year} '
        "at 5:00 PM has been cancelled."
    )
    drain(db_url)  # the make-up
    makeup = session_no(conn, student, 11)
    generated = events(conn, purchase, "SESSIONS_GENERATED")[-1]
    assert (generated["sessionIds"], generated["sessionCount"]) == ([str(makeup["id"])], 1)
    told = events(conn, purchase, "NOTIFICATION_REQUESTED")[-1]
    md = makeup["scheduled_date"]
    assert told["body"] == (
        f"Your session with T0 has been scheduled for {md:%A}, {md:%B} {md.day}, {md.year} at "
        "5:00 PM. Please be ready!"
    )


def test_an_upgrade_generates_the_extra_sessions(conn: Conn, db_url: str) -> None:
    student, purchase = enrolled(conn, db_url)
    course = purchase_of(conn, student)["course_id"]
    f.payment(conn, student, course, {**GOOD, "sessionCount": 20, "upgrade": True})
    drain(db_url)
    first, extra = events(conn, purchase, "SESSIONS_GENERATED")
    assert (first["sessionCount"], extra["sessionCount"]) == (10, 10)
    assert extra["allocationId"] == first["allocationId"]
    assert len(events(conn, purchase, "TRAINER_ALLOCATED")) == 1  # same trainer, same allocation


def test_a_trainer_who_leaves_hands_over_with_events(conn: Conn, db_url: str) -> None:
    student, purchase = enrolled(conn, db_url, trainers=2)
    first = allocation_of(conn, student)
    move_into_past(conn, 5, "session_number <= 3")
    conn.execute("UPDATE trainers SET status = 'inactive' WHERE id = %s", (first["trainer_id"],))
    drain(db_url)
    new = allocation_of(conn, student)
    [dealloc] = events(conn, purchase, "STUDENT_DEALLOCATED")
    assert (dealloc["allocationId"], dealloc["reason"]) == (str(first["id"]), "trainer_left")
    told = notes(conn, purchase)
    assert ("trainer", str(first["trainer_id"]), "Assignment Ended") in told
    assert ("student", str(student), "Trainer Changed") in told
    assert ("trainer", str(new["trainer_id"]), "New Assignment") in told
    [_, allocated] = events(conn, purchase, "TRAINER_ALLOCATED")
    assert (allocated["allocationId"], allocated["sessionCount"]) == (str(new["id"]), 7)
    changed = next(e for e in events(conn, purchase) if e.get("title") == "Trainer Changed")
    assert changed["body"] == (
        'Trainer T1 will now teach your course "Robotics with Arduino" in place of T0. '
        "You will receive session details soon."
    )
    # the sessions the move cancelled are not told one by one: the change says it
    assert not any(t.startswith("Session") and "Cancelled" in t for _, _, t in told)


def test_a_reschedule_with_the_same_trainer_moves_sessions_only(conn: Conn, db_url: str) -> None:
    _, purchase = enrolled(conn, db_url, trainers=2)
    seen = len(events(conn, purchase))
    conn.execute("SELECT reschedule(%s, '7 PM', NULL, NULL)", (purchase,))
    drain(db_url)
    after = events(conn, purchase)[seen:]
    assert [e["type"] for e in after] == [
        "TRAINER_ALLOCATED",
        "SESSIONS_GENERATED",
        "NOTIFICATION_REQUESTED",
    ]
    assert after[2]["title"] == "Sessions Rescheduled"
    assert "now start on" in after[2]["body"] and after[2]["body"].endswith("at 7:00 PM.")


def test_a_reschedule_to_another_trainer_deallocates(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    early = f.trainer(conn, name="Early", rating=4.9, slot=("08:00", "18:00"))
    late = f.trainer(conn, name="Late", rating=4.0, slot=("08:00", "22:00"))
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    purchase = purchase_of(conn, student)["id"]
    old = allocation_of(conn, student)
    assert old["trainer_id"] == early
    conn.execute("SELECT reschedule(%s, '8 PM', NULL, NULL)", (purchase,))
    drain(db_url)
    [dealloc] = events(conn, purchase, "STUDENT_DEALLOCATED")
    assert (dealloc["allocationId"], dealloc["reason"], dealloc["trainerId"]) == (
        str(old["id"]),
        "rescheduled",
        str(early),
    )
    told = notes(conn, purchase)
    assert ("trainer", str(early), "Assignment Ended") in told
    assert ("student", str(student), "Trainer Changed") in told
    assert ("trainer", str(late), "New Assignment") in told


def test_an_override_is_an_admin_override_event(conn: Conn, db_url: str) -> None:
    student, purchase = enrolled(conn, db_url)
    far = f.trainer(conn, name="Far", specialties=["Painting"], lat=13.5, lng=77.59)
    # Alice signs in to the console: the database names her from her session, never a name.
    session = secrets.token_urlsafe(32)
    conn.execute("SELECT * FROM console_sign_in(%s, %s)", (add_operator(conn, "alice"), session))
    request = one(
        conn,
        "SELECT assign_trainer(%s, %s, true, 'the parents asked', %s) AS id",
        purchase,
        far,
        session,
    )["id"]
    drain(db_url)
    new = allocation_of(conn, student)
    assert new["trainer_id"] == far
    [override] = events(conn, purchase, "ADMIN_OVERRIDE")
    assert {k: override[k] for k in (*APP_FIELDS["ADMIN_OVERRIDE"], "userId", "role")} == {
        "action": "assign_trainer",
        "targetId": str(new["id"]),
        "targetType": "allocation",
        "changes": {
            "purchaseId": str(purchase),
            "trainerId": str(far),
            "previousTrainerId": override["changes"]["previousTrainerId"],
            "overriddenRules": ["no_specialty", "out_of_range"],
            "requestId": request,
        },
        "reason": "the parents asked",
        "userId": "console:alice",
        "role": "admin",
    }
    assert override["changes"]["previousTrainerId"] is not None
    [dealloc] = events(conn, purchase, "STUDENT_DEALLOCATED")
    assert dealloc["reason"] == "reassigned"


def test_the_functions_for_moved_and_substituted_sessions(conn: Conn, db_url: str) -> None:
    """Issue 24 moves one session or gives it to a substitute, then calls these."""
    student, purchase = enrolled(conn, db_url, trainers=2)
    session = session_no(conn, student, 4)
    old_day, old_time = session["scheduled_date"], session["scheduled_time"]
    new_day = old_day + timedelta(days=1)
    with conn.transaction():
        conn.execute(
            "UPDATE tutoring_sessions SET scheduled_date = %s, scheduled_time = '18:30', "
            "starts_at = starts_at + interval '1 day 90 minutes', "
            "ends_at = ends_at + interval '1 day 90 minutes' WHERE id = %s",
            (new_day, session["id"]),
        )
        moved_id = one(
            conn,
            "SELECT emit_session_rescheduled(%s, %s, %s) AS id",
            session["id"],
            old_day,
            old_time,
        )["id"]
    [moved] = events(conn, purchase, "SESSION_RESCHEDULED")
    assert moved["eventId"] == str(moved_id)
    assert {k: moved[k] for k in APP_FIELDS["SESSION_RESCHEDULED"]} == {
        "sessionId": str(session["id"]),
        "oldDate": old_day.isoformat(),
        "newDate": new_day.isoformat(),
        "oldTimeSlot": "5:00 PM",
        "newTimeSlot": "6:30 PM",
        "trainerId": str(session["trainer_id"]),
        "studentId": str(student),
    }
    assert notes(conn, purchase)[-1] == ("student", str(student), "Session Rescheduled")

    substitute = one(conn, "SELECT id FROM trainers WHERE id <> %s", session["trainer_id"])["id"]
    with conn.transaction():
        conn.execute(
            "UPDATE tutoring_sessions SET trainer_id = %s WHERE id = %s",
            (substitute, session["id"]),
        )
        conn.execute(
            "SELECT emit_session_substituted(%s, %s)", (session["id"], session["trainer_id"])
        )
    [sub] = events(conn, purchase, "SESSION_SUBSTITUTED")
    assert {k: sub[k] for k in APP_FIELDS["SESSION_SUBSTITUTED"]} == {
        "sessionId": str(session["id"]),
        "originalTrainerId": str(session["trainer_id"]),
        "substituteTrainerId": str(substitute),
        "studentId": str(student),
        "date": new_day.isoformat(),
        "timeSlot": "6:30 PM",
    }
    # The outbox's trigger told the student and both trainers already (migration 0019);
    # emit_session_substituted's events have the same ids, so it adds nothing.
    assert notes(conn, purchase)[-3:] == [
        ("student", str(student), "Trainer Substituted"),
        ("trainer", str(session["trainer_id"]), "Session Reassigned"),
        ("trainer", str(substitute), "Session Assigned"),
    ]
    told = events(conn, purchase, "NOTIFICATION_REQUESTED")[-3]
    assert told["title"] == "Trainer Substituted" and told["body"].startswith(
        "Trainer T1 will take"
    )

    # what they refuse, changing nothing
    count = len(events(conn))
    for sql, params, error in (
        (
            "SELECT emit_session_rescheduled(%s, %s, %s)",
            (session["id"], new_day, time(18, 30)),
            psycopg.errors.InvalidParameterValue,
        ),
        (
            "SELECT emit_session_rescheduled(%s, %s, NULL)",
            (session["id"], old_day),
            psycopg.errors.InvalidParameterValue,
        ),
        (
            "SELECT emit_session_rescheduled(%s, %s, %s)",
            (UUID(int=1), old_day, old_time),
            psycopg.errors.NoDataFound,
        ),
        (
            "SELECT emit_session_substituted(%s, %s)",
            (session["id"], substitute),
            psycopg.errors.InvalidParameterValue,
        ),
        (
            "SELECT emit_session_substituted(%s, %s)",
            (session["id"], UUID(int=2)),
            psycopg.errors.NoDataFound,
        ),
    ):
        with pytest.raises(error):
            conn.execute(sql, params)
    assert len(events(conn)) == count


# -- ids ------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(key=st.text(max_size=200), other=st.text(max_size=200))
def test_event_ids_are_stable_version_8_uuids(key: str, other: str) -> None:
    assert event_id(key) == event_id(key)
    assert event_id(key).version == 8 and event_id(key).variant == "specified in RFC 4122"
    assert (event_id(key) == event_id(other)) == (key == other)


def test_event_ids_agree_with_the_database(conn: Conn) -> None:
    keys = ["", "x", "PURCHASE_CREATED:" + str(UUID(int=5)), "ünïcödé ✓", "a" * 1000, "\t'\""]
    for key in keys:
        row = one(conn, "SELECT kc_event_id(%s) AS id", key)
        assert row["id"] == event_id(key), key


# -- the feed: commit order, cursors, retention ------------------------------------------------


def _write(conn: Conn, key: str) -> None:
    """One event written as a trigger would (the owner; tests connect as a superuser)."""
    conn.execute(
        "SELECT kc_store_events(ARRAY[NULL::uuid], ARRAY[kc_event_notification("
        "%s, gen_random_uuid(), 'student', 'info', 't', 'b', NULL, '{}'::jsonb, now())])",
        (key,),
    )


def _feed(conn: Conn, after: int = 0) -> list[tuple[int, str]]:
    return [
        (r["pos"], r["event"]["eventId"])
        for r in conn.execute("SELECT * FROM events_after(%s, 1000)", (after,)).fetchall()
    ]


def test_a_late_commit_is_not_skipped(conn: Conn, db_url: str) -> None:
    """Transaction A writes first and commits last: its event has the lower seq, and a reader
    that followed seq would have moved past it. The feed gives it the next position."""
    with (
        psycopg.connect(db_url, row_factory=dict_row) as a,
        psycopg.connect(db_url, row_factory=dict_row) as b,
    ):
        _write(a, "A")
        _write(b, "B")
        b.commit()
        first = _feed(conn)
        a.commit()
    second = _feed(conn, first[-1][0])
    ids = {
        "A": str(event_id("NOTIFICATION_REQUESTED:student:A")),
        "B": str(event_id("NOTIFICATION_REQUESTED:student:B")),
    }
    assert first == [(1, ids["B"])]
    assert second == [(2, ids["A"])]
    seqs = one(
        conn,
        "SELECT array_agg(event_id::text ORDER BY seq) AS ids FROM business_events",
    )["ids"]
    assert seqs == [ids["A"], ids["B"]]  # written in the other order


def test_concurrent_writers_and_readers_lose_and_repeat_nothing(conn: Conn, db_url: str) -> None:
    written: list[str] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        with psycopg.connect(db_url, row_factory=dict_row) as w:
            for i in range(60):
                _write(w, f"w{n}-{i}")
                if i % 3 == 2:
                    w.commit()
            w.commit()
        with lock:
            written.extend(
                str(event_id(f"NOTIFICATION_REQUESTED:student:w{n}-{i}")) for i in range(60)
            )

    seen: list[tuple[int, str]] = []
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen += _feed(conn, seen[-1][0] if seen else 0)
    seen += _feed(conn, seen[-1][0] if seen else 0)
    assert [p for p, _ in seen] == list(range(1, len(seen) + 1))
    assert sorted(i for _, i in seen) == sorted(written)


def test_consumers_keep_their_cursor(conn: Conn) -> None:
    _write(conn, "before")
    assert one(conn, "SELECT register_event_consumer('app') AS p")["p"] == 1  # at the end
    assert one(conn, "SELECT register_event_consumer('audit', true) AS p")["p"] == 0
    assert one(conn, "SELECT register_event_consumer('app', true) AS p")["p"] == 1  # kept
    _write(conn, "after")
    assert [r["pos"] for r in conn.execute("SELECT * FROM consumer_events('app')")] == [2]
    assert [r["pos"] for r in conn.execute("SELECT * FROM consumer_events('audit')")] == [1, 2]
    assert one(conn, "SELECT advance_event_consumer('audit', 2) AS p")["p"] == 2
    assert one(conn, "SELECT advance_event_consumer('audit', 1) AS p")["p"] == 2  # never back
    lag = {r["consumer"]: r for r in conn.execute("SELECT * FROM business_event_lag")}
    assert (lag["app"]["events_behind"], lag["audit"]["events_behind"]) == (1, 0)
    assert lag["app"]["seconds_behind"] >= 0 and lag["audit"]["seconds_behind"] == 0
    for sql, error in (
        ("SELECT advance_event_consumer('audit', 3)", psycopg.errors.InvalidParameterValue),
        ("SELECT advance_event_consumer('audit', -1)", psycopg.errors.InvalidParameterValue),
        ("SELECT advance_event_consumer('nobody', 1)", psycopg.errors.NoDataFound),
        ("SELECT * FROM consumer_events('nobody')", psycopg.errors.NoDataFound),
        ("SELECT register_event_consumer('Bad Name')", psycopg.errors.InvalidParameterValue),
        ("SELECT register_event_consumer(NULL)", psycopg.errors.InvalidParameterValue),
        ("SELECT * FROM events_after(-1)", psycopg.errors.InvalidParameterValue),
        ("SELECT * FROM events_after(0, 0)", psycopg.errors.InvalidParameterValue),
        ("SELECT prune_business_events('-1 day')", psycopg.errors.InvalidParameterValue),
    ):
        with pytest.raises(error):
            conn.execute(sql)
    assert one(conn, "SELECT drop_event_consumer('app') AS gone")["gone"] is True
    assert one(conn, "SELECT drop_event_consumer('app') AS gone")["gone"] is False


def test_retention_keeps_what_a_consumer_has_not_read(conn: Conn) -> None:
    for key in ("old-1", "old-2", "old-3"):
        _write(conn, key)
    conn.execute("SELECT register_event_consumer('app', true)")
    conn.execute("SELECT * FROM events_after(0)")  # numbered
    conn.execute("SELECT advance_event_consumer('app', 2)")
    conn.execute("UPDATE business_events SET occurred_at = now() - interval '40 days'")
    _write(conn, "new")
    assert one(conn, "SELECT prune_business_events('30 days') AS n")["n"] == 2
    left = [r["pos"] for r in conn.execute("SELECT * FROM consumer_events('app')")]
    assert left == [3, 4]  # read from where it was, nothing lost
    conn.execute("SELECT drop_event_consumer('app')")
    assert one(conn, "SELECT prune_business_events('30 days') AS n")["n"] == 1
    assert one(conn, "SELECT count(*) AS n FROM business_events")["n"] == 1
    assert one(conn, "SELECT count(*) AS n FROM business_event_positions")["n"] == 1


def test_the_prune_job_prunes_events_too(conn: Conn) -> None:
    from workers.database.sql import q

    _write(conn, "x")
    conn.execute("UPDATE business_events SET occurred_at = now() - interval '40 days'")
    row = conn.execute(q("prune_events"), {"keep": timedelta(days=30)}).fetchone()
    assert row == {"events_deleted": 1}


# -- operations: status, trace, doctor, the console -------------------------------------------


def test_status_trace_and_the_console_show_the_feed(conn: Conn, db_url: str) -> None:
    from tests.console_world import console, page_text
    from tests.helpers import worker_settings
    from workers.ops import commands as ops

    student, purchase = enrolled(conn, db_url)
    conn.execute("SELECT register_event_consumer('redis-relay', true)")
    status = ops.status(conn, worker_settings(db_url))
    assert "business events: last position 7" in status
    assert "consumer redis-relay: at 0, 7 event(s) and" in status
    traced = ops.trace(conn, purchase)
    assert traced is not None
    assert "What the app was told" in traced
    assert traced.count("NOTIFICATION_REQUESTED") == 3 and "Trainer Assigned" in traced
    problems = ops.doctor(db_url, worker_settings(db_url))
    assert not any("behind" in p.what for p in problems)  # only seconds old
    conn.execute("UPDATE business_events SET occurred_at = now() - interval '1 hour'")
    problems = ops.doctor(db_url, worker_settings(db_url))
    [behind] = [p for p in problems if "event consumer" in p.what]
    assert "redis-relay is 7 event(s)" in behind.what and "drop_event_consumer" in behind.fix
    with console(db_url) as client:
        overview = page_text(client.get("/").text)
        assert "redis-relay 0 7" in overview
        trace = page_text(client.get(f"/trace/{student}").text)
        assert "What the app was told" in trace
        assert trace.count("NOTIFICATION_REQUESTED") == 3 and "TRAINER_ALLOCATED" in trace


def test_events_command_prints_after_a_position(conn: Conn, db_url: str) -> None:
    import os
    import subprocess
    import sys

    enrolled(conn, db_url)
    env = {**os.environ, "DATABASE_URL": db_url}
    done = subprocess.run(
        [sys.executable, "-m", "workers", "events", "--after", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["6", "7"]
    assert "SESSIONS_GENERATED" in lines[0] and "title Session Scheduled" in lines[1]
    as_json = subprocess.run(
        [sys.executable, "-m", "workers", "events", "--json", "--limit", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    first, second = (json.loads(line) for line in as_json.stdout.splitlines())
    assert (first["position"], first["event"]["type"]) == (1, "PURCHASE_CREATED")
    assert (second["position"], second["event"]["type"]) == (2, "COURSE_ACCESS_GRANTED")
    follow = subprocess.Popen(
        [sys.executable, "-m", "workers", "events", "--after", "7", "--follow"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        conn.execute("UPDATE payments SET status = 'refunded'")
        assert follow.stdout is not None
        line = follow.stdout.readline()  # the refund's first event, as it commits
        assert line.split()[0] == "8" and "STUDENT_DEALLOCATED" in line
    finally:
        follow.terminate()
        follow.wait(timeout=30)
        if follow.stdout is not None:
            follow.stdout.close()
