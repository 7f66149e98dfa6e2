"""Time passing: courses that end, trainers who leave or change, students who reschedule.

The database keeps the books (migration 0009): `complete_finished()` completes sessions and
courses, triggers notice cancelled sessions and changed trainers and enqueue the allocation
stage, `reschedule()` records a request and enqueues it too. This module does the rest:

- `complete` is a periodic job (pgqueuer cron, every minute): one bounded pass of
  `complete_finished()`. `sweep` (every ten minutes) runs `sweep_lifecycle()`, which
  re-enqueues what an enqueue swallowed by a running job left behind.
- `before_allocation` runs first in every allocation job. An open reschedule request is
  carried out; a live allocation whose trainer can no longer teach it is moved. Either way
  the live allocation ends (its future sessions cancelled, the past stays) and what is still
  owed goes, numbering on, to the best trainer by the usual rules (when rescheduling, the
  same trainer first), or waits in a pending allocation that says why.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from uuid import UUID

from psycopg.rows import DictRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from workers.database.connections import AsyncConn, fetch_all, fetch_one, transaction
from workers.database.sql import q
from workers.errors import InconsistentStateError
from workers.rules.matching import Decision, Reason
from workers.rules.schedule import PlannedSession
from workers.settings import Settings
from workers.stages.contract import Outcome, StageContext
from workers.stages.search import allocate_best, remaining_plan, search

log = logging.getLogger(__name__)


def prefer(decision: Decision, trainer_id: UUID | None) -> Decision:
    """The same decision with `trainer_id` ranked first when they are eligible at all."""
    first = [c for c in decision.ranked if c.trainer_id == trainer_id]
    if not first:
        return decision
    rest = [c for c in decision.ranked if c.trainer_id != trainer_id]
    return dataclasses.replace(decision, ranked=tuple(first + rest))


async def complete(pool: AsyncConnectionPool[AsyncConn], settings: Settings) -> dict[str, int]:
    """One bounded pass of complete_finished() (the minute job)."""
    async with transaction(pool) as conn:
        row = await fetch_one(
            conn,
            q("complete_finished"),
            {
                "grace": timedelta(minutes=settings.completion_grace_minutes),
                "limit": settings.lifecycle_batch,
            },
        )
    assert row is not None
    return {k: int(v) for k, v in row.items()}


async def sweep(pool: AsyncConnectionPool[AsyncConn], settings: Settings) -> int:
    """sweep_lifecycle() (every ten minutes: it reads every live allocation's sessions ahead,
    ~0.45 s for 5,000 allocations with 100k sessions, and the triggers do the real work);
    then, in a transaction of its own, cover_leaves(): sessions written for a trainer on
    approved leave after its approval get a substitute or are cancelled (migration 0022)."""
    async with transaction(pool) as conn:
        row = await fetch_one(conn, q("sweep_lifecycle"), {"limit": settings.lifecycle_batch})
    assert row is not None
    async with transaction(pool) as conn:
        covered = await fetch_one(conn, q("cover_leaves"), {"limit": 200})
    if covered is not None and covered["covered"]:
        log.warning(
            "leave sweep: %d session(s) written for a trainer on leave got a substitute or "
            "were cancelled",
            covered["covered"],
        )
    return int(row["enqueued"])


async def before_allocation(
    conn: AsyncConn, purchase: DictRow, holidays: set[date], ctx: StageContext
) -> Outcome | None:
    """The outcome of a reschedule or a move, or None: the allocation stage goes on."""
    changes = (
        await fetch_all(conn, q("open_schedule_changes"), {"purchase_id": purchase["id"]})
        if purchase["has_changes"]
        else []
    )
    if changes:
        return await carry_out_reschedule(conn, purchase, changes, holidays, ctx)
    if purchase["live_allocation_status"] != "approved":
        return None
    unfit = await fetch_one(
        conn, q("unfit_allocation"), {"allocation_id": purchase["live_allocation_id"]}
    )
    if unfit is None:
        return None
    return await move_away(conn, purchase, unfit, holidays, ctx)


@dataclass(frozen=True)
class Replanned:
    live: DictRow  # the purchase's new live allocation (approved or pending)
    cancelled: int  # future sessions of the ended allocation
    sessions: list[PlannedSession]  # what the new allocation is to teach


async def replan(
    conn: AsyncConn,
    purchase: DictRow,
    holidays: set[date],
    ctx: StageContext,
    *,
    reason: Reason,
    why: str,
    keep: UUID | None = None,
    exclude: UUID | None = None,
) -> Replanned | None:
    """End the approved live allocation and allocate what is still owed; None (nothing
    changed) when every session has already started."""
    live_id = purchase["live_allocation_id"]
    if not await remaining_plan(conn, purchase, replacing=live_id, holidays=holidays):
        return None
    ended = await fetch_one(
        conn,
        q("end_allocation"),
        {"allocation_id": live_id, "reason": reason.value, "detail": why},
    )
    fresh = await fetch_one(
        conn, q("lock_purchase_for_allocation"), {"purchase_id": purchase["id"]}
    )
    assert ended is not None and fresh is not None
    sessions = await remaining_plan(conn, fresh, replacing=None, holidays=holidays)
    if not sessions:  # the check above says otherwise: roll back rather than strand the purchase
        raise InconsistentStateError(
            f"purchase {purchase['id']}: nothing to re-plan after ending {live_id}"
        )
    decision = prefer(await search(conn, fresh, sessions, ctx, exclude=exclude), keep)
    await allocate_best(conn, fresh, sessions, decision, replacing=None)
    live = await fetch_one(conn, q("live_allocation"), {"purchase_id": purchase["id"]})
    assert live is not None
    return Replanned(live, int(ended["cancelled"]), sessions)


async def move_away(
    conn: AsyncConn, purchase: DictRow, unfit: DictRow, holidays: set[date], ctx: StageContext
) -> Outcome:
    old_trainer = purchase["live_trainer_id"]
    why = f"trainer {old_trainer} can no longer teach this course: {unfit['detail']}"
    moved = await replan(
        conn, purchase, holidays, ctx, reason=Reason.TRAINER_LEFT, why=why, exclude=old_trainer
    )
    if moved is None:
        return Outcome("skipped", f"{why}; every session has started, nothing to move")
    note = {
        "trainerChange": {
            "fromTrainer": str(old_trainer),
            "fromAllocation": str(purchase["live_allocation_id"]),
            "why": unfit["why"],
            "detail": unfit["detail"],
            "futureSessionsCancelled": moved.cancelled,
        }
    }
    live = await annotate(conn, moved.live["id"], note, pending_reason=Reason.TRAINER_LEFT, why=why)
    if live["status"] == "approved":
        return Outcome(
            "succeeded",
            f"{why}: sessions {_numbers(moved.sessions)} moved to trainer {live['trainer_id']} "
            f"(allocation {live['id']})",
        )
    return Outcome(
        "succeeded", f"allocation {live['id']} pending ({live['reason']}): {live['reason_detail']}"
    )


async def carry_out_reschedule(
    conn: AsyncConn,
    purchase: DictRow,
    changes: list[DictRow],
    holidays: set[date],
    ctx: StageContext,
) -> Outcome | None:
    """The purchase already has its new slot, date and mode (reschedule() set them); what
    is ahead is re-planned from them. None when no trainer is assigned yet: the usual search
    then uses the new schedule."""
    ids = [int(row["id"]) for row in changes]
    label = "request " + ", ".join(map(str, ids))
    if purchase["live_allocation_status"] != "approved":
        await _close(
            conn,
            ids,
            "applied: the purchase was waiting for a trainer; the search uses the new schedule",
            purchase["live_allocation_id"],
        )
        return None
    last = changes[-1]
    schedule = (
        f"{last['to_schedule_mode']} at {last['to_time_slot']:%H:%M} from {last['to_start_date']}"
    )
    old_trainer = purchase["live_trainer_id"]
    moved = await replan(
        conn,
        purchase,
        holidays,
        ctx,
        reason=Reason.RESCHEDULED,
        why=f"rescheduled by {label}: {schedule}",
        keep=old_trainer,
    )
    if moved is None:
        done = "nothing to re-plan, every session has started"
        await _close(conn, ids, done, purchase["live_allocation_id"])
        return Outcome("skipped", f"{label}: {done}")
    note = {
        "reschedule": {
            "requests": ids,
            "fromTrainer": str(old_trainer),
            "fromAllocation": str(purchase["live_allocation_id"]),
            "futureSessionsCancelled": moved.cancelled,
        }
    }
    live = await annotate(conn, moved.live["id"], note)
    if live["status"] == "approved":
        whom = (
            "the same trainer"
            if live["trainer_id"] == old_trainer
            else f"trainer {live['trainer_id']} (trainer {old_trainer} cannot teach it)"
        )
        done = (
            f"sessions {_numbers(moved.sessions)} {schedule}, first on "
            f"{moved.sessions[0].local_date}, with {whom}"
        )
    else:
        done = f"pending ({live['reason']}): {live['reason_detail']}"
    # The request's own outcome does not repeat its id; the history line names the requests.
    await _close(conn, ids, done, live["id"])
    return Outcome("succeeded", f"{label}: {done}")


async def annotate(
    conn: AsyncConn,
    allocation_id: UUID,
    note: dict[str, Any],
    *,
    pending_reason: Reason | None = None,
    why: str = "",
) -> DictRow:
    row = await fetch_one(
        conn,
        q("annotate_allocation"),
        {
            "allocation_id": allocation_id,
            "note": Jsonb(note),
            "pending_reason": pending_reason.value if pending_reason else None,
            "why": why,
        },
    )
    assert row is not None
    return row


async def _close(conn: AsyncConn, ids: list[int], outcome: str, allocation_id: UUID | None) -> None:
    await conn.execute(
        q("close_schedule_changes"),
        {"ids": ids, "outcome": outcome, "allocation_id": allocation_id},
    )


def _numbers(sessions: list[PlannedSession]) -> str:
    return f"{sessions[0].number}..{sessions[-1].number}"
