"""Issue 11 through the real triggers and worker: payments in the shapes the existing app and
its services write become the right typed purchase, schedule and allocation metadata."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import allocation_of, drain, one
from workers.ops import commands as ops

Conn = psycopg.Connection[DictRow]


def tomorrow() -> date:
    return datetime.now(ZoneInfo("Asia/Kolkata")).date() + timedelta(days=1)


def purchase_of(conn: Conn, payment: UUID) -> DictRow:
    return one(conn, "SELECT * FROM student_course_purchases WHERE payment_id = %s", payment)


def sessions_of(conn: Conn, student: UUID) -> list[DictRow]:
    return conn.execute(
        "SELECT * FROM tutoring_sessions WHERE student_id = %s ORDER BY session_number",
        (student,),
    ).fetchall()


def test_nested_schedule_sets_the_slot_and_the_start(conn: Conn, db_url: str) -> None:
    """The issue's example: before, 16:00 from tomorrow; now 18:00 from the date chosen."""
    course = f.course(conn)
    trainer = f.trainer(conn)
    student = f.student(conn)
    start = tomorrow() + timedelta(days=9)
    payment = f.payment(
        conn,
        student,
        course,
        {"sessionCount": 10, "schedule": {"startDate": start.isoformat(), "timeSlot": "6:00 PM"}},
    )
    drain(db_url)

    purchase = purchase_of(conn, payment)
    assert (purchase["preferred_time_slot"], purchase["start_date"]) == (time(18), start)
    assert set(purchase["defaults_applied"]) == {
        "scheduleMode",
        "sessionDuration",
        "learningMode",
        "groupSize",
    }
    sessions = sessions_of(conn, student)
    assert [s["scheduled_date"] for s in sessions] == [start + timedelta(days=i) for i in range(10)]
    assert {(s["scheduled_time"], s["trainer_id"], s["delivery"]) for s in sessions} == {
        (time(18), trainer, "home")
    }


def test_the_apps_names_and_words_and_unread_keys(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn, weekdays=[7], slot=("08:00", "20:00"))
    student = f.student(conn)
    # What the payment service writes for a session booking, with the app's own extras.
    payment = f.payment(
        conn,
        student,
        course,
        {
            "purchaseTier": 20,
            "sessionCount": "20",
            "groupSize": "3",
            "learningMode": "home",
            "scheduleType": "SUNDAY_ONLY",
            "classTime": "10:00 AM",
            "preferredDate": tomorrow().isoformat(),
            "coinsToRedeem": 0,
            "pricing": {"finalPrice": 4999.5, "pricingType": "official"},
            "schedule": {"mode": "sunday", "note": "gate code 1234"},
        },
    )
    drain(db_url)

    purchase = purchase_of(conn, payment)
    assert (purchase["purchase_tier"], purchase["schedule_mode"]) == (20, "sunday_only")
    assert (purchase["group_size"], purchase["learning_mode"]) == (3, "home")
    assert purchase["preferred_time_slot"] == time(10)
    assert purchase["session_duration_minutes"] == 80
    assert purchase["unused_keys"] == ["coinsToRedeem", "pricing", "schedule.note"]
    # Kept as sent: the database copies the values (numbers exactly).
    assert one(
        conn,
        """SELECT pu.unused_metadata = jsonb_build_object(
                      'coinsToRedeem', p.metadata -> 'coinsToRedeem',
                      'pricing', p.metadata -> 'pricing',
                      'schedule', jsonb_build_object('note', p.metadata #> '{schedule,note}'))
                  AS same
           FROM student_course_purchases pu JOIN payments p ON p.id = pu.payment_id""",
    )["same"]
    assert purchase["unused_metadata"]["pricing"]["pricingType"] == "official"

    sessions = sessions_of(conn, student)
    assert len(sessions) == 20 and all(s["scheduled_date"].isoweekday() == 7 for s in sessions)

    metadata = allocation_of(conn, student)["metadata"]
    first = sessions[0]["scheduled_date"].isoformat()
    assert metadata["schedule"]["mode"] == "sunday"
    assert {k: metadata["schedule"][k] for k in ("timeSlot", "startDate", "date")} == {
        "timeSlot": "10:00",
        "startDate": first,
        "date": first,
    }
    assert {
        k: metadata[k]
        for k in (
            "sessionCount",
            "timeSlot",
            "startDate",
            "scheduleType",
            "scheduleMode",
            "groupSize",
            "learningMode",
            "isSundayOnly",
        )
    } == {
        "sessionCount": 20,
        "timeSlot": "10:00",
        "startDate": first,
        "scheduleType": "Sunday Only",
        "scheduleMode": "sunday",
        "groupSize": 3,
        "learningMode": "home",
        "isSundayOnly": True,
    }
    trace = one(conn, "SELECT * FROM purchase_trace WHERE payment_id = %s", payment)
    assert (trace["group_size"], trace["learning_mode"]) == (3, "home")
    assert trace["unused_keys"] == ["coinsToRedeem", "pricing", "schedule.note"]
    text = ops.trace(conn, payment)
    assert text is not None
    assert "group  3 students" in text
    assert "metadata unused  coinsToRedeem, pricing, schedule.note" in text


def test_names_that_disagree_are_a_rejection_naming_both(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    payment = f.payment(
        conn,
        f.student(conn),
        course,
        {
            "sessionCount": 10,
            "purchaseTier": 20,
            "timeSlot": "4:00 PM",
            "schedule": {"timeSlot": "6:00 PM"},
        },
    )
    drain(db_url)
    rejected = one(conn, "SELECT * FROM rejected_payments WHERE payment_id = %s", payment)
    assert rejected["reason"] == "invalid_metadata"
    assert rejected["errors"] == [
        {
            "field": "purchaseTier",
            "message": "20 disagrees with sessionCount 10: send one of them, or the same value "
            "in both",
        },
        {
            "field": "schedule.timeSlot",
            "message": "'6:00 PM' disagrees with timeSlot '4:00 PM': send one of them, or the "
            "same value in both",
        },
    ]
    assert one(conn, "SELECT count(*) AS n FROM student_course_purchases")["n"] == 0
    # Correcting the payment (one value) makes the purchase.
    conn.execute(
        "UPDATE payments SET metadata = metadata - 'purchaseTier' #- '{schedule,timeSlot}' "
        "WHERE id = %s",
        (payment,),
    )
    drain(db_url)
    assert purchase_of(conn, payment)["preferred_time_slot"] == time(16)


def test_hybrid_schedule_is_18_online_and_12_at_home(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    student = f.student(conn)
    payment = f.payment(
        conn, student, course, {"sessionCount": 30, "learningMode": "hybrid", "timeSlot": "5 PM"}
    )
    wrong = f.payment(conn, f.student(conn), course, {"sessionCount": 10, "learningMode": "hybrid"})
    drain(db_url)

    assert purchase_of(conn, payment)["learning_mode"] == "hybrid"
    where = [s["delivery"] for s in sessions_of(conn, student)]
    assert len(where) == 30
    assert where[:6] == ["online"] * 6
    assert where[6:10] == ["online", "home", "online", "home"]
    assert (where.count("online"), where.count("home")) == (18, 12)
    metadata = allocation_of(conn, student)["metadata"]
    assert (metadata["learningMode"], metadata["schedule"]["online"]) == ("hybrid", 18)
    assert metadata["schedule"]["atHome"] == 12

    rejected = one(conn, "SELECT errors FROM rejected_payments WHERE payment_id = %s", wrong)
    assert rejected["errors"] == [
        {
            "field": "sessionCount",
            "message": "is 10, but learningMode hybrid is exactly 30 sessions (18 online, 12 at "
            "home)",
        }
    ]


def test_database_keeps_the_hybrid_split(conn: Conn, db_url: str) -> None:
    # kc_session_delivery agrees with delivery_for: tests/database/test_rule_pairs.py.
    course = f.course(conn)
    f.trainer(conn)
    student = f.student(conn)
    f.payment(conn, student, course, {"sessionCount": 30, "learningMode": "hybrid"})
    drain(db_url)
    with pytest.raises(psycopg.errors.CheckViolation, match="session 8 of a hybrid course"):
        conn.execute(
            "UPDATE tutoring_sessions SET delivery = 'online' WHERE student_id = %s "
            "AND session_number = 8",
            (student,),
        )
    with pytest.raises(psycopg.errors.CheckViolation, match="hybrid_is_30"):
        conn.execute("UPDATE student_course_purchases SET purchase_tier = 20")
    # An INSERT is checked once per statement, over every row it writes.
    with pytest.raises(
        psycopg.errors.CheckViolation, match="session 32 of a hybrid course is home, not online"
    ):
        conn.execute(
            """INSERT INTO tutoring_sessions (allocation_id, session_number, student_id,
            trainer_id, course_id, scheduled_date, scheduled_time, starts_at, ends_at,
            duration_minutes, delivery)
            SELECT allocation_id, session_number + 30, student_id, trainer_id, course_id,
                   scheduled_date + 60, scheduled_time, starts_at + interval '60 days',
                   ends_at + interval '60 days', duration_minutes, 'online'
            FROM tutoring_sessions WHERE student_id = %s AND session_number IN (1, 2)""",
            (student,),
        )


@pytest.mark.parametrize(
    ("first_mode", "first_offset", "new_mode", "new_offset", "approved"),
    [
        # The new sessions next to the far home's sessions are online (hybrid 1-6): allowed.
        ("home", 0, "hybrid", 4, True),
        ("home", 0, "home", 4, False),
        # The trainer's sessions next to the new ones are online (hybrid 1-7): allowed.
        ("hybrid", 3, "home", 0, True),
        ("home", 3, "home", 0, False),
    ],
)
def test_neighbouring_sessions_rule_is_for_home_sessions_only(
    conn: Conn,
    db_url: str,
    first_mode: str,
    first_offset: int,
    new_mode: str,
    new_offset: int,
    approved: bool,
) -> None:
    course = f.course(conn)
    trainer = f.trainer(conn, radius_km=100)
    first = f.student(conn, name="First")
    day = tomorrow()
    count = {"home": 10, "hybrid": 30}
    f.payment(
        conn,
        first,
        course,
        {
            "sessionCount": count[first_mode],
            "learningMode": first_mode,
            "timeSlot": "3:00 PM",
            "startDate": (day + timedelta(days=first_offset)).isoformat(),
        },
    )
    drain(db_url)
    assert allocation_of(conn, first)["trainer_id"] == trainer

    far = f.student(conn, name="Far", lat=f.HOME[0] + 0.2)  # ~22 km from First
    f.payment(
        conn,
        far,
        course,
        {
            "sessionCount": count[new_mode],
            "learningMode": new_mode,
            "timeSlot": "4:00 PM",  # right after First's 15:00 sessions
            "startDate": (day + timedelta(days=new_offset)).isoformat(),
        },
    )
    drain(db_url)
    allocation = allocation_of(conn, far)
    if approved:
        assert (allocation["status"], allocation["trainer_id"]) == ("approved", trainer)
    else:
        assert (allocation["status"], allocation["reason"]) == (
            "pending",
            "too_far_between_sessions",
        )


def preferred(conn: Conn, db_url: str, choice: Any) -> tuple[DictRow, UUID]:
    course = f.course(conn)
    best = f.trainer(conn, rating=4.9, name="Best")
    student = f.student(conn)
    f.payment(conn, student, course, {"sessionCount": 10, "timeSlot": "4 PM", "trainerId": choice})
    drain(db_url)
    return allocation_of(conn, student), best


def test_the_students_trainer_is_chosen_when_every_rule_allows(conn: Conn, db_url: str) -> None:
    chosen = f.trainer(conn, rating=3.2, name="Chosen", lat=f.HOME[0] + 0.05)
    allocation, best = preferred(conn, db_url, str(chosen))
    assert (allocation["status"], allocation["trainer_id"]) == ("approved", chosen)
    metadata = allocation["metadata"]
    assert metadata["preferredTrainer"] == {
        "trainerId": str(chosen),
        "chosen": True,
        "outcome": "chosen",
        "reason": None,
    }
    # The ranking still says who the rules would have put first.
    assert metadata["match"]["ranking"][0]["trainerId"] == str(best)
    assert metadata["match"]["chosen"]["rank"] == 2


@pytest.mark.parametrize(
    ("setup", "outcome", "reason"),
    [
        (
            {"slot": ("08:00", "12:00")},
            "no_free_slot",
            "no_free_slot: the trainer is not available at 16:00 on every weekday of the schedule",
        ),
        ({"status": "inactive"}, "trainer_inactive", "trainer_inactive: the trainer is not active"),
        (
            {"specialties": ("Dance",)},
            "no_specialty",
            "no_specialty: the trainer does not teach Robotics with Arduino",
        ),
        ({"lat": f.HOME[0] + 1.0}, "out_of_range", None),
        (None, "unknown_trainer", "no trainer has this id"),
    ],
)
def test_a_trainer_who_cannot_take_it_is_recorded_with_the_rule(
    conn: Conn, db_url: str, setup: dict[str, Any] | None, outcome: str, reason: str | None
) -> None:
    choice = uuid4() if setup is None else f.trainer(conn, name="Chosen", **setup)
    allocation, best = preferred(conn, db_url, str(choice))
    assert (allocation["status"], allocation["trainer_id"]) == ("approved", best)
    recorded = allocation["metadata"]["preferredTrainer"]
    assert (recorded["trainerId"], recorded["chosen"], recorded["outcome"]) == (
        str(choice),
        False,
        outcome,
    )
    if reason is None:
        assert recorded["reason"].startswith(f"{outcome}: the student's home is ")
    else:
        assert recorded["reason"] == reason
    purchase = one(conn, "SELECT preferred_trainer_id FROM student_course_purchases")
    assert purchase["preferred_trainer_id"] == choice
    trace = one(conn, "SELECT preferred_trainer_outcome FROM purchase_trace")
    assert trace["preferred_trainer_outcome"] == outcome


def test_upgrade_cannot_change_the_learning_mode(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    student = f.student(conn)
    f.payment(conn, student, course, {"sessionCount": 10})
    drain(db_url)
    upgrade = f.payment(
        conn, student, course, {"sessionCount": 30, "upgrade": True, "learningMode": "hybrid"}
    )
    drain(db_url)
    rejected = one(conn, "SELECT * FROM rejected_payments WHERE payment_id = %s", upgrade)
    assert rejected["reason"] == "upgrade_changes_mode"
    assert rejected["errors"] == [
        {
            "field": "learningMode",
            "message": "the purchase being upgraded is home; an upgrade cannot make it hybrid",
        }
    ]
    assert one(conn, "SELECT purchase_tier FROM student_course_purchases")["purchase_tier"] == 10
