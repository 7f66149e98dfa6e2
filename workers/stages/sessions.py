"""Sessions stage: an approved allocation -> the purchase's remaining sessions, numbered on.

One statement writes the whole schedule inside the stage's transaction; numbers that exist
already are left alone, so running the stage twice writes nothing twice. The schedule starts
where the allocation stage checked the trainer (first_session_date), or right after this
allocation's last session when the tier was raised, and continues the purchase's numbering
after any sessions that stand from an earlier allocation.
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from workers.database.connections import AsyncConn, fetch_one
from workers.database.sql import q
from workers.rules.schedule import local_tomorrow, plan_sessions, resume_from
from workers.runtime.runner import Outcome, StageContext, load_holidays


async def handle(conn: AsyncConn, allocation_id: UUID, ctx: StageContext) -> Outcome:
    allocation = await fetch_one(
        conn, q("lock_allocation_for_sessions"), {"allocation_id": allocation_id}
    )
    if allocation is None:
        return Outcome("skipped", "allocation does not exist")
    if allocation["status"] != "approved":
        return Outcome("skipped", f"allocation is {allocation['status']}, not approved")
    tier = allocation["purchase_tier"]
    remaining = tier - allocation["delivered"]
    if remaining <= 0:
        return Outcome("skipped", f"all {tier} sessions exist")

    # Own sessions never precede first_session_date (they are planned from it), so this is
    # "after this allocation's sessions, else from the day checked", and after the purchase's.
    tomorrow = local_tomorrow(allocation["timezone"], datetime.now(UTC))
    earliest = resume_from(
        max(allocation["first_session_date"], tomorrow),
        allocation["own_last_date"],
        allocation["last_date"],
    )
    sessions = plan_sessions(
        allocation,
        earliest=earliest,
        count=remaining,
        first_number=allocation["last_number"] + 1,
        holidays=await load_holidays(conn, earliest),
    )
    cursor = await conn.execute(
        q("insert_sessions"),
        {
            "allocation_id": allocation_id,
            "student_id": allocation["student_id"],
            "trainer_id": allocation["trainer_id"],
            "course_id": allocation["course_id"],
            "duration": allocation["session_duration_minutes"],
            "numbers": [s.number for s in sessions],
            "dates": [s.local_date for s in sessions],
            "times": [s.local_time for s in sessions],
            "starts": [s.starts_at for s in sessions],
            "ends": [s.ends_at for s in sessions],
            "deliveries": [s.delivery.value for s in sessions],
        },
    )
    return Outcome(
        "succeeded",
        f"{cursor.rowcount} sessions written "
        f"({sessions[0].number}..{sessions[-1].number} of {tier})",
    )
