"""One session at a time (issue 24, part A): whether one trainer can take one session at a
local date and time (kc_session_fit), the best other trainer who can (kc_best_substitute),
and moving one session (requests, approval, refusals that change nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import drain, one

Conn = psycopg.Connection[DictRow]
# Weekdays from Monday 1 March 2027: sessions 1..5 on 1..5 March, 6..10 on 8..12 March.
WEEKDAYS = {"sessionCount": 10, "timeSlot": "5:00 PM", "scheduleMode": "weekdays"}
START = "2027-03-01"
MON, TUE, WED, SAT, SUN = (date(2027, 3, d) for d in (1, 2, 3, 6, 7))
NEAR = (f.HOME[0] + 0.027, f.HOME[1])  # about 3 km north of the student
FAR = (f.HOME[0] - 0.072, f.HOME[1])  # about 8 km south: beyond the 5 km between sessions


@dataclass(frozen=True)
class World:
    course: UUID
    trainer: UUID  # Ravi: weekdays and Sundays 08:00-20:00, not Saturdays
    student: UUID  # Asha, female, at HOME: weekdays at 17:00
    session: UUID  # Asha's session 1, Monday 1 March 17:00
    near: UUID  # Bela, 3 km away: weekdays at 10:00 with Ravi
    far: UUID  # Chitra, 8 km away: weekdays at 14:00 with Ravi


def _session(conn: Conn, student: UUID, number: int) -> UUID:
    return UUID(
        str(
            one(
                conn,
                "SELECT id FROM tutoring_sessions WHERE student_id = %s AND session_number = %s",
                student,
                number,
            )["id"]
        )
    )


@pytest.fixture
def world(conn: Conn, db_url: str) -> World:
    course = f.course(conn)
    trainer = f.trainer(conn, weekdays=(1, 2, 3, 4, 5, 7), radius_km=20)
    asha = f.student(conn, gender="female", name="Asha")
    bela = f.student(conn, lat=NEAR[0], lng=NEAR[1], name="Bela")
    chitra = f.student(conn, lat=FAR[0], lng=FAR[1], name="Chitra")
    for student, slot in ((asha, "5:00 PM"), (bela, "10:00"), (chitra, "2:00 PM")):
        f.payment(conn, student, course, {**WEEKDAYS, "timeSlot": slot, "startDate": START})
    drain(db_url)
    placed = one(
        conn,
        "SELECT count(*) FILTER (WHERE trainer_id = %s) AS ravi, count(*) AS n "
        "FROM tutoring_sessions",
        trainer,
    )
    assert placed == {"ravi": 30, "n": 30}
    return World(course, trainer, asha, _session(conn, asha, 1), bela, chitra)


def fit(conn: Conn, session: UUID, trainer: UUID, day: date, at: str, full: bool) -> str | None:
    row = one(
        conn,
        "SELECT kc_session_fit(%s, %s, %s, %s::time, %s) AS why",
        session,
        trainer,
        day,
        at,
        full,
    )
    return None if row["why"] is None else str(row["why"])


# -- kc_session_fit ---------------------------------------------------------------------------


def test_a_free_trainer_fits(conn: Conn, world: World) -> None:
    for full in (False, True):
        assert fit(conn, world.session, world.trainer, TUE, "11:30", full) is None
        assert fit(conn, world.session, world.trainer, SUN, "10:00", full) is None
        # Half an hour later the same day overlaps only where the session is now.
        assert fit(conn, world.session, world.trainer, MON, "17:30", full) is None
        # The hour after Chitra's 14:00 session is out of the neighbours' reach from 16:00.
        assert fit(conn, world.session, world.trainer, TUE, "16:00", full) is None


def test_busy_overlap(conn: Conn, world: World) -> None:
    assert fit(conn, world.session, world.trainer, TUE, "10:30", False) == (
        "no_free_slot: trainer Ravi already has a session on Tuesday, March 2, 2027 at 10:00 AM"
    )
    # The student's own next session at that time.
    assert fit(conn, world.session, world.trainer, TUE, "16:30", True) == (
        "student_busy: the student already has a session of Robotics with Arduino on "
        "Tuesday, March 2, 2027 at 5:00 PM"
    )
    # A cancelled session holds nobody's time.
    conn.execute(
        "UPDATE tutoring_sessions SET status = 'cancelled' WHERE student_id = %s "
        "AND scheduled_date = %s",
        (world.near, TUE),
    )
    assert fit(conn, world.session, world.trainer, TUE, "10:30", False) is None


def test_unavailable_at_that_weekday_or_slot(conn: Conn, world: World) -> None:
    assert fit(conn, world.session, world.trainer, SAT, "10:00", False) == (
        "no_free_slot: trainer Ravi is not available on Saturdays from 10:00 AM to 11:00 AM"
    )
    # The slot must be covered to its end: 19:30-20:30 against 08:00-20:00.
    assert fit(conn, world.session, world.trainer, TUE, "19:30", True) == (
        "no_free_slot: trainer Ravi is not available on Tuesdays from 7:30 PM to 8:30 PM"
    )
    assert fit(conn, world.session, world.trainer, TUE, "19:00", True) is None


def test_neighbours_too_far(conn: Conn, world: World) -> None:
    # Chitra's session ends at 15:00, 8 km away: a session from 15:30 is within its hour.
    expected = (
        "too_far_between_sessions: 1 of trainer Ravi's sessions in the hour before or after "
        "are at a home more than 5 km from this student's"
    )
    assert fit(conn, world.session, world.trainer, TUE, "15:30", False) == expected
    assert fit(conn, world.session, world.trainer, TUE, "12:30", False) == expected
    # Bela, 3 km away, is near enough: just after her 10:00 session.
    assert fit(conn, world.session, world.trainer, TUE, "11:00", False) is None
    # The setting is the database's.
    conn.execute("UPDATE kc_settings SET max_sequential_km = 10")
    assert fit(conn, world.session, world.trainer, TUE, "15:30", False) is None


def test_the_time_itself(conn: Conn, world: World) -> None:
    assert fit(conn, world.session, world.trainer, TUE, "23:30", False) == (
        "ends_after_midnight: a 60-minute session at 11:30 PM would end after midnight"
    )
    conn.execute("INSERT INTO holidays VALUES (%s, 'Holi')", (WED,))
    assert fit(conn, world.session, world.trainer, WED, "10:00", True) == (
        "holiday: Wednesday, March 3, 2027 is a holiday (Holi)"
    )


@pytest.mark.parametrize(
    ("rule", "trainer", "why"),
    [
        ("inactive", {"status": "inactive"}, "trainer_inactive: trainer Other is not active"),
        (
            "specialty",
            {"specialties": ("Painting",)},
            "no_specialty: trainer Other does not teach Robotics with Arduino",
        ),
        (
            "gender",
            {"gender": "male"},
            "gender_mismatch: trainer Other's gender does not match the student's preference",
        ),
        (
            "range",
            {"lat": f.HOME[0] + 0.2, "radius_km": 5},
            "out_of_range: the student's home is 22.3 km from trainer Other's base, beyond the "
            "5 km service radius",
        ),
    ],
)
def test_each_full_mode_rule(
    conn: Conn, world: World, rule: str, trainer: dict[str, object], why: str
) -> None:
    other = f.trainer(conn, name="Other", **trainer)  # type: ignore[arg-type]
    assert fit(conn, world.session, other, TUE, "12:00", True) == why, rule
    # Without p_full only the time rules count: that trainer is free then.
    assert fit(conn, world.session, other, TUE, "12:00", False) is None


def test_fit_refuses_what_it_cannot_judge(conn: Conn, world: World) -> None:
    with pytest.raises(psycopg.errors.NoDataFound, match="no session"):
        fit(conn, world.course, world.trainer, TUE, "12:00", True)
    with pytest.raises(psycopg.errors.NoDataFound, match="no trainer"):
        fit(conn, world.session, world.course, TUE, "12:00", True)
    with pytest.raises(psycopg.errors.NullValueNotAllowed):
        conn.execute(
            "SELECT kc_session_fit(%s, %s, NULL, '10:00', true)", (world.session, world.trainer)
        )


# -- kc_best_substitute -----------------------------------------------------------------------


def best(conn: Conn, session: UUID, day: date, at: str) -> UUID | None:
    row = one(conn, "SELECT kc_best_substitute(%s, %s, %s::time) AS id", session, day, at)
    return None if row["id"] is None else UUID(str(row["id"]))


def test_the_best_substitute_is_ranked_as_the_matching_ranks(conn: Conn, world: World) -> None:
    # Nobody else yet: the session's own trainer is never its substitute.
    assert best(conn, world.session, TUE, "12:00") is None
    sub = f.trainer(conn, name="Sub", specialties=("arduino",), rating=5.0)
    assert best(conn, world.session, TUE, "12:00") == sub
    low = f.trainer(conn, name="Low", rating=3.0)
    assert best(conn, world.session, TUE, "12:00") == low  # category before subcategory
    high = f.trainer(conn, name="High", rating=4.9)
    assert best(conn, world.session, TUE, "12:00") == high  # then higher rating
    # Busy trainers and those who fail a rule are passed over.
    conn.execute("UPDATE trainers SET gender = 'male' WHERE id = %s", (high,))
    assert best(conn, world.session, TUE, "12:00") == low
    conn.execute("DELETE FROM trainer_availability WHERE weekday = 6")
    assert best(conn, world.session, SAT, "12:00") is None  # nobody works Saturdays now
    weekend = f.trainer(conn, name="Weekend", weekdays=(6,), rating=1.0)
    assert best(conn, world.session, SAT, "12:00") == weekend
