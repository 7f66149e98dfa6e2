"""Allocation stage: a purchase -> one live trainer_allocations row (approved, or pending).

1. Lock the purchase; an approved live allocation ends the job (idempotent).
2. Plan the schedule the trainer must be free for (the same generator the sessions stage uses).
3. Measure every candidate in one set-based query; `matching.decide` applies the rules.
4. For the best candidate: lock the trainer row and re-check capacity and overlaps (including
   approved allocations whose sessions are not written yet). The first that still fits wins.
5. Nobody fits: the one pending row is written or updated in place, with reason and sentence.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, time, timedelta
from itertools import pairwise
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from workers.db import Conn, fetch_all, fetch_one
from workers.matching import CandidateFacts, Decision, Reason, capacity_for, decide
from workers.schedule import (
    PlannedSession,
    ScheduleMode,
    allowed_weekdays,
    build_schedule,
    next_valid_day,
)
from workers.sql import q
from workers.stages import Outcome, StageContext

log = logging.getLogger(__name__)


async def load_holidays(conn: Conn, from_day: date) -> set[date]:
    return {row["day"] for row in await fetch_all(conn, q("holidays_from"), {"from_day": from_day})}


def plan_sessions(row: DictRow, first_day: date, holidays: set[date]) -> list[PlannedSession]:
    """The schedule of a purchase row (any query that selects the purchase's typed columns)."""
    return build_schedule(
        start=first_day,
        count=row["purchase_tier"],
        mode=ScheduleMode(row["schedule_mode"]),
        slot=row["preferred_time_slot"],
        duration_minutes=row["session_duration_minutes"],
        zone=ZoneInfo(row["timezone"]),
        holidays=holidays,
    )


def first_session_day(row: DictRow, holidays: set[date]) -> date:
    """The purchase's start date, moved forward when it has passed (never schedule the past)."""
    tomorrow = datetime.now(ZoneInfo(row["timezone"])).date() + timedelta(days=1)
    return next_valid_day(
        max(row["start_date"], tomorrow), ScheduleMode(row["schedule_mode"]), holidays
    )


def _overlaps(a: list[PlannedSession], b: list[PlannedSession]) -> bool:
    spans = sorted([(s.starts_at, s.ends_at) for s in a] + [(s.starts_at, s.ends_at) for s in b])
    return any(nxt[0] < cur[1] for cur, nxt in pairwise(spans))


async def handle(conn: Conn, purchase_id: UUID, ctx: StageContext) -> Outcome:
    purchase = await fetch_one(
        conn, q("lock_purchase_for_allocation"), {"purchase_id": purchase_id}
    )
    if purchase is None:
        return Outcome("skipped", "purchase does not exist")
    if not purchase["is_active"]:
        return Outcome("skipped", "purchase is not active")
    if purchase["live_allocation_status"] == "approved":
        return Outcome("skipped", f"allocation {purchase['live_allocation_id']} is approved")

    holidays = await load_holidays(conn, purchase["start_date"])
    first_day = first_session_day(purchase, holidays)
    sessions = plan_sessions(purchase, first_day, holidays)
    decision = await search(conn, purchase, sessions)

    for candidate in decision.ranked:
        if await still_fits(conn, candidate.trainer_id, purchase, sessions):
            allocation_id = await write_allocation(
                conn,
                purchase,
                first_day,
                sessions,
                status="approved",
                trainer=candidate,
                decision=decision,
            )
            return Outcome(
                "succeeded", f"allocation {allocation_id} approved: trainer {candidate.trainer_id}"
            )
        log.info(
            "trainer %s no longer fits purchase %s; trying the next",
            candidate.trainer_id,
            purchase_id,
        )

    if decision.ranked:  # every ranked trainer was taken between the search and the lock
        decision = Decision(
            (),
            Reason.AT_CAPACITY,
            "Every trainer who fitted was taken by another purchase a moment ago; retrying later.",
            decision.eliminated,
        )
    allocation_id = await write_allocation(
        conn, purchase, first_day, sessions, status="pending", trainer=None, decision=decision
    )
    return Outcome("succeeded", f"allocation {allocation_id} pending: {decision.reason}")


async def search(conn: Conn, purchase: DictRow, sessions: list[PlannedSession]) -> Decision:
    slot: time = purchase["preferred_time_slot"]
    slot_end = (
        datetime.combine(date.min, slot) + timedelta(minutes=purchase["session_duration_minutes"])
    ).time()
    rows = await fetch_all(
        conn,
        q("candidate_facts"),
        {
            "purchase_id": purchase["id"],
            "starts": [s.starts_at for s in sessions],
            "ends": [s.ends_at for s in sessions],
            "weekdays": sorted(allowed_weekdays(ScheduleMode(purchase["schedule_mode"]))),
            "slot_start": slot,
            "slot_end": slot_end,
        },
    )
    active = await fetch_one(conn, q("count_active_trainers"), {})
    candidates = [
        CandidateFacts(
            trainer_id=row["trainer_id"],
            specialty_match=row["specialty_match"],
            gender_ok=row["gender_ok"],
            distance_km=row["distance_km"],
            service_radius_km=row["service_radius_km"],
            available=row["available"],
            overlapping_sessions=row["overlapping_sessions"],
            live_allocations=row["live_allocations"],
            rating=row["rating"],
        )
        for row in rows
    ]
    return decide(
        candidates,
        active_trainers=active["active"] if active else 0,
        course=purchase["course_title"],
        slot=slot.strftime("%H:%M"),
    )


async def still_fits(
    conn: Conn, trainer_id: UUID, purchase: DictRow, sessions: list[PlannedSession]
) -> bool:
    """Under the trainer's row lock: active, under capacity, and free at every session."""
    row = await fetch_one(
        conn,
        q("lock_and_recheck_trainer"),
        {
            "trainer_id": trainer_id,
            "starts": [s.starts_at for s in sessions],
            "ends": [s.ends_at for s in sessions],
        },
    )
    if row is None or row["status"] != "active" or row["overlapping_sessions"] > 0:
        return False
    if row["live_allocations"] >= capacity_for(row["rating"]):
        return False
    promised = await fetch_all(
        conn,
        q("trainer_unscheduled_allocations"),
        {"trainer_id": trainer_id, "purchase_id": purchase["id"]},
    )
    for other in promised:
        holidays = await load_holidays(conn, other["first_session_date"])
        theirs = plan_sessions(other, other["first_session_date"], holidays)
        if _overlaps(sessions, theirs):
            return False
    return True


async def write_allocation(
    conn: Conn,
    purchase: DictRow,
    first_day: date,
    sessions: list[PlannedSession],
    *,
    status: str,
    trainer: CandidateFacts | None,
    decision: Decision,
) -> UUID:
    metadata: dict[str, Any] = {
        # Older readers look for these two keys.
        "startDate": first_day.isoformat(),
        "schedule": {
            "timeSlot": purchase["preferred_time_slot"].strftime("%H:%M"),
            "mode": purchase["schedule_mode"],
            "durationMinutes": purchase["session_duration_minutes"],
            "sessionCount": purchase["purchase_tier"],
            "lastDate": sessions[-1].local_date.isoformat(),
        },
        "match": decision.explain(trainer),
    }
    params = {
        "purchase_id": purchase["id"],
        "student_id": purchase["student_id"],
        "course_id": purchase["course_id"],
        "trainer_id": trainer.trainer_id if trainer else None,
        "status": status,
        "reason": None if trainer else (decision.reason.value if decision.reason else None),
        "reason_detail": None if trainer else decision.sentence,
        "metadata": Jsonb(metadata),
        "first_session_date": first_day if trainer else None,
        "allocation_id": purchase["live_allocation_id"],
    }
    if purchase["live_allocation_id"] is not None:
        row = await fetch_one(conn, q("update_pending_allocation"), params)
    else:
        row = await fetch_one(conn, q("insert_allocation"), params)
    if row is None:
        raise RuntimeError(f"allocation for purchase {purchase['id']} changed under its lock")
    return UUID(str(row["id"]))
