"""Sessions stage: an approved allocation -> the purchase's remaining sessions, numbered on.

A batch of allocations is locked by one statement and their sessions are written by another;
numbers that exist already are left alone, so running the stage twice writes nothing twice.
When that statement is refused (a session would double-book a trainer), the batch runs again
one allocation at a time, so only the allocation at fault fails. The schedule starts where
the allocation stage checked the trainer (first_session_date), or right after this
allocation's last session when the tier was raised, and continues the purchase's numbering
after any sessions that stand from an earlier allocation.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime
from uuid import UUID

from psycopg.rows import DictRow

from workers.database.connections import AsyncConn, fetch_all
from workers.database.sql import q
from workers.rules.schedule import PlannedSession, local_tomorrow, plan_sessions, resume_from
from workers.stages.contract import (
    Outcome,
    Results,
    Stage,
    StageContext,
    StageSpec,
    load_holidays,
    one_of,
    together_or_one_by_one,
)


async def handle(conn: AsyncConn, refs: list[UUID], ctx: StageContext) -> Results:
    return await together_or_one_by_one(conn, refs, ctx, together=_together, one=one_of(_together))


SPEC = StageSpec(Stage.SESSIONS, handle)


async def _together(conn: AsyncConn, refs: list[UUID], ctx: StageContext) -> Results:
    rows = await fetch_all(conn, q("lock_allocations_for_sessions"), {"allocation_ids": refs})
    by_id = {row["id"]: row for row in rows}
    results: Results = {}
    todo: list[tuple[DictRow, date]] = []
    for ref in refs:
        allocation = by_id.get(ref)
        if allocation is None:
            results[ref] = Outcome("skipped", "allocation does not exist")
        elif allocation["status"] != "approved":
            results[ref] = Outcome("skipped", f"allocation is {allocation['status']}, not approved")
        elif allocation["purchase_tier"] - allocation["delivered"] <= 0:
            results[ref] = Outcome("skipped", f"all {allocation['purchase_tier']} sessions exist")
        else:
            todo.append((allocation, _earliest(allocation)))
    if not todo:
        return results
    holidays = await load_holidays(conn, min(earliest for _, earliest in todo))
    plans = [
        (
            allocation,
            plan_sessions(
                allocation,
                earliest=earliest,
                count=allocation["purchase_tier"] - allocation["delivered"],
                first_number=allocation["last_number"] + 1,
                holidays=holidays,
            ),
        )
        for allocation, earliest in todo
    ]
    written = await _insert(conn, plans)
    for allocation, sessions in plans:
        results[allocation["id"]] = Outcome(
            "succeeded",
            written_text(
                written[allocation["id"]],
                sessions[0].number,
                sessions[-1].number,
                allocation["purchase_tier"],
            ),
        )
    return results


def written_text(written: int, first: int, last: int, tier: int) -> str:
    """`10 sessions written: numbers 1..10 of 10`; a make-up's number is above the course's
    count, so it says why instead of `21..21 of 20`."""
    numbers = f"number {first}" if first == last else f"numbers {first}..{last}"
    text = f"{written} session{'' if written == 1 else 's'} written: {numbers}"
    if last > tier:
        return f"{text}, making up for cancelled sessions (the course has {tier})"
    return f"{text} of {tier}"


def _earliest(allocation: DictRow) -> date:
    """Own sessions never precede first_session_date (they are planned from it), so this is
    "after this allocation's sessions, else from the day checked", and after the purchase's."""
    tomorrow = local_tomorrow(allocation["timezone"], datetime.now(UTC))
    return resume_from(
        max(allocation["first_session_date"], tomorrow),
        allocation["own_last_date"],
        allocation["last_date"],
    )


async def _insert(
    conn: AsyncConn, plans: list[tuple[DictRow, list[PlannedSession]]]
) -> Counter[UUID]:
    """Every planned session of the batch in one statement; sessions written per allocation."""
    rows = [(allocation, s) for allocation, sessions in plans for s in sessions]
    written = await fetch_all(
        conn,
        q("insert_sessions"),
        {
            "allocation_ids": [a["id"] for a, _ in rows],
            "student_ids": [a["student_id"] for a, _ in rows],
            "trainer_ids": [a["trainer_id"] for a, _ in rows],
            "course_ids": [a["course_id"] for a, _ in rows],
            "durations": [a["session_duration_minutes"] for a, _ in rows],
            "numbers": [s.number for _, s in rows],
            "dates": [s.local_date for _, s in rows],
            "times": [s.local_time for _, s in rows],
            "starts": [s.starts_at for _, s in rows],
            "ends": [s.ends_at for _, s in rows],
            "deliveries": [s.delivery.value for _, s in rows],
        },
    )
    return Counter(row["allocation_id"] for row in written)
