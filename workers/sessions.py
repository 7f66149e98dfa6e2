"""Sessions stage: an approved allocation -> its purchase_tier sessions, numbered 1..N.

One statement writes the whole schedule inside the stage's transaction; numbers that exist
already are left alone, so running the stage twice writes nothing twice.
"""

from __future__ import annotations

from uuid import UUID

from workers.allocation import load_holidays, plan_sessions
from workers.db import Conn, fetch_one
from workers.sql import q
from workers.stages import Outcome, StageContext


async def handle(conn: Conn, allocation_id: UUID, ctx: StageContext) -> Outcome:
    allocation = await fetch_one(
        conn, q("lock_allocation_for_sessions"), {"allocation_id": allocation_id}
    )
    if allocation is None:
        return Outcome("skipped", "allocation does not exist")
    if allocation["status"] != "approved":
        return Outcome("skipped", f"allocation is {allocation['status']}, not approved")
    tier = allocation["purchase_tier"]
    if allocation["existing"] >= tier:
        return Outcome("skipped", f"all {tier} sessions exist")

    first_day = allocation["first_session_date"]
    sessions = plan_sessions(allocation, first_day, await load_holidays(conn, first_day))
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
        },
    )
    return Outcome("succeeded", f"{cursor.rowcount} of {tier} sessions written")
