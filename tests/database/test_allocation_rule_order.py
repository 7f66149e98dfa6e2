"""The matching rules are applied in one order (matching.RULES), and the SQL candidate search
follows it: it measures the costly facts (overlapping sessions, far neighbours) only for
trainers who pass every rule before them. For every pair of rules, a trainer failing both is
out at the earlier one, by the search and the decision alike, and no rule ever reads a fact
the search left unmeasured ("a rule needs a fact that was not measured")."""

from __future__ import annotations

import asyncio
import itertools
import re
from datetime import datetime, timedelta
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import DictRow, dict_row

from tests import factories as f
from tests.helpers import run_one, worker_settings
from workers.database.sql import q
from workers.rules.matching import RULE_ORDER, CandidateFacts, Decision, Reason
from workers.rules.schedule import PlannedSession
from workers.settings import REPO_ROOT
from workers.stages.contract import Stage, StageContext, load_holidays
from workers.stages.search import remaining_plan, search, search_ranked

Conn = psycopg.Connection[DictRow]
AsyncConn = psycopg.AsyncConnection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}
FAR = (f.HOME[0] + 0.2, f.HOME[1])  # ~22 km from the student's home
PAIRS = list(itertools.combinations(RULE_ORDER, 2))


async def book(
    conn: AsyncConn, trainer: UUID, course: UUID, starts: list[datetime], home: tuple[float, float]
) -> None:
    """Another student's approved allocation with `trainer`, with a 60-minute session at each
    of `starts`, written as the stages would have written them."""
    student = await _id(
        conn,
        "INSERT INTO students (full_name, home_lat, home_lng) VALUES ('Other', %s, %s) "
        "RETURNING id",
        home,
    )
    payment = await _id(
        conn,
        "INSERT INTO payments (student_id, course_id, amount_cents, currency, status, metadata) "
        "VALUES (%s, %s, 499900, 'INR', 'initiated', '{}') RETURNING id",
        (student, course),
    )
    purchase = await _id(
        conn,
        "INSERT INTO student_course_purchases (payment_id, student_id, course_id, "
        "purchase_tier, start_date, preferred_time_slot, schedule_mode, "
        "session_duration_minutes) VALUES (%s, %s, %s, 10, current_date, '16:00', 'daily', 60) "
        "RETURNING id",
        (payment, student, course),
    )
    allocation = await _id(
        conn,
        "INSERT INTO trainer_allocations (purchase_id, student_id, course_id, trainer_id, "
        "status, first_session_date, allocated_at) "
        "VALUES (%s, %s, %s, %s, 'approved', current_date, now()) RETURNING id",
        (purchase, student, course, trainer),
    )
    for number, start in enumerate(starts, 1):
        await conn.execute(
            "INSERT INTO tutoring_sessions (allocation_id, session_number, student_id, "
            "trainer_id, course_id, scheduled_date, scheduled_time, starts_at, ends_at, "
            "duration_minutes) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 60)",
            (
                allocation,
                number,
                student,
                trainer,
                course,
                start.date(),
                start.time(),
                start,
                start + timedelta(minutes=60),
            ),
        )


async def _id(conn: AsyncConn, sql: str, params: tuple[object, ...]) -> UUID:
    cursor = await conn.execute(sql, params)
    row = await cursor.fetchone()
    assert row is not None
    return UUID(str(row["id"]))


async def make_fail(
    conn: AsyncConn, trainer: UUID, course: UUID, rules: set[Reason], ours: list[PlannedSession]
) -> None:
    """Make `trainer` (who passes every rule) fail exactly `rules`."""
    bookings: list[tuple[list[datetime], tuple[float, float]]] = []
    if Reason.NO_FREE_SLOT in rules:  # busy at our first session (a costly fact)
        bookings.append(([ours[0].starts_at], f.HOME))
    if Reason.TOO_FAR_BETWEEN_SESSIONS in rules:  # ends 30 minutes before our second, far away
        bookings.append(([ours[1].starts_at - timedelta(minutes=90)], FAR))
    if Reason.AT_CAPACITY in rules:  # a NULL rating allows 4 live allocations
        bookings += [([], f.HOME)] * (4 - len(bookings))
    for starts, home in bookings:
        await book(conn, trainer, course, starts, home)
    changes = {
        Reason.TRAINER_INACTIVE: "status = 'inactive'",
        Reason.NO_SPECIALTY: "specialties = '{Painting}'",
        Reason.GENDER_MISMATCH: "gender = 'male'",
        Reason.OUT_OF_RANGE: "service_radius_km = 0.5",
        Reason.AT_CAPACITY: "rating = NULL",
    }
    for rule in rules & changes.keys():
        await conn.execute(f"UPDATE trainers SET {changes[rule]} WHERE id = %s", (trainer,))


async def search_both_ways(
    db_url: str, purchase_id: UUID, trainer: UUID, course: UUID, rules: set[Reason]
) -> tuple[Decision, Decision, Decision]:
    """In one transaction: plan the purchase, make the trainer fail `rules`, then search every
    candidate (the full search), for the trainer alone (an admin's or student's choice), and
    as the stage does for a new purchase (rank first, then check)."""
    ctx = StageContext(worker_settings(db_url))
    async with await psycopg.AsyncConnection.connect(db_url, row_factory=dict_row) as conn:
        cursor = await conn.execute(q("lock_purchase_for_allocation"), {"purchase_id": purchase_id})
        purchase = await cursor.fetchone()
        assert purchase is not None
        holidays = await load_holidays(conn, purchase["start_date"])
        ours = await remaining_plan(conn, purchase, replacing=None, holidays=holidays)
        await make_fail(conn, trainer, course, rules, ours)
        # The bookings' live allocations counted (trainer_load) as their commit would.
        await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        everyone = await search(conn, purchase, ours, ctx)
        alone = await search(conn, purchase, ours, ctx, only=trainer)
        ranked = await search_ranked(conn, purchase, ours, ctx)
        await conn.rollback()
    return everyone, alone, ranked


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_a_trainer_failing_two_rules_is_out_at_the_earlier(
    conn: Conn, db_url: str, first: Reason, second: Reason
) -> None:
    course = f.course(conn)
    student = f.student(conn, gender="female")
    trainer = f.trainer(conn, rating=4.7)
    run_one(db_url, Stage.PURCHASE, f.payment(conn, student, course, GOOD))
    purchase = conn.execute("SELECT id FROM student_course_purchases").fetchone()
    assert purchase is not None

    # Raises ValueError ("a rule needs a fact that was not measured") when the SQL filter
    # and RULE_ORDER disagree.
    everyone, alone, ranked = asyncio.run(
        search_both_ways(db_url, purchase["id"], trainer, course, {first, second})
    )

    # Named alone, every fact is measured: the trainer fails exactly these two rules.
    [named] = alone.candidates
    assert named.failed_rules() == (first, second)
    assert named.first_failed_rule() is first

    # The stage's search: inactive trainers and those who do not teach the course are not
    # candidates at all; anyone else is measured up to the first rule they fail.
    assert everyone.chosen is None
    if first is Reason.TRAINER_INACTIVE:
        assert (everyone.candidates, everyone.reason) == ((), Reason.NO_TRAINER)
    elif first is Reason.NO_SPECIALTY:
        assert (everyone.candidates, everyone.reason) == ((), Reason.NO_SPECIALTY)
    else:
        [candidate] = everyone.candidates
        assert candidate.first_failed_rule() is first
        assert everyone.reason is first
        assert everyone.eliminated == {first.value: 1}
    # Rank first, then check: the same answer (a trainer out at a cheap rule is counted, one
    # who passes them is measured in rule order).
    assert (ranked.chosen, ranked.reason, ranked.eliminated, ranked.sentence) == (
        everyone.chosen,
        everyone.reason,
        everyone.eliminated,
        everyone.sentence,
    )


def test_candidate_facts_columns_are_the_dataclass_fields(conn: Conn) -> None:
    """CandidateFacts.from_rows takes the query's columns by position: a fact added to one and
    not the other, or put elsewhere, fails here."""
    cursor = conn.execute(
        q("candidate_facts"),
        {
            "purchase_id": UUID(int=0),
            "starts": [],
            "ends": [],
            "at_home": [],
            "weekdays": [1],
            "slot_start": "16:00",
            "slot_end": "17:00",
            "only_trainer": None,
            "count_far": True,
        },
    )
    assert cursor.description is not None
    columns = [column.name for column in cursor.description]
    assert columns == list(CandidateFacts.__dataclass_fields__)


def test_docs_list_the_rules_in_order() -> None:
    section = (REPO_ROOT / "docs" / "matching.md").read_text(encoding="utf-8")
    codes = re.findall(r"^\| \d+ \|.*\| `(\w+)` \|$", section, re.M)
    assert codes == [Reason.NO_TRAINER.value, *(rule.value for rule in RULE_ORDER)]
