"""Allocation stage: a purchase -> one live trainer_allocations row (approved, or pending).

1. Lock the purchase. An open admin request is carried out first (same rules unless it is an
   override; see `carry_out_request`), then an open reschedule, or a move away from a trainer
   who can no longer teach it (`workers/stages/lifecycle.py`). An approved allocation whose schedule
   is complete ends the job; one that is short of sessions (an upgrade, a make-up) keeps its
   trainer when free.
2. Plan the remaining schedule (the same generator and rules the sessions stage uses).
3. Rank first, then check (`search_ranked`): the candidates who pass the cheap rules are
   ranked in SQL and the costly rules measured for the top of the ranking, a batch at a time,
   until one passes every rule (everyone, when nobody does); `matching.decide` applies the
   rules. The full search (`search`: every candidate measured in one query) serves a
   student's or an admin's choice, moves and reschedules, and the rest of the ranking when
   the batches' eligible trainers were all taken meanwhile.
4. For the best candidate: lock the trainer and re-check capacity and overlaps (including
   approved allocations whose sessions are not written yet). The first that still fits wins.
5. Nobody fits: the one pending row is written or updated in place, with reason and sentence.

The search and the booking, and their lock order, are `workers/stages/search.py`.
"""

from __future__ import annotations

import logging
from datetime import date
from uuid import UUID

from psycopg.rows import DictRow

from workers.database.connections import (
    AsyncConn,
    fetch_one,
    savepoint_or_refusal,
)
from workers.database.sql import q
from workers.errors import DatabaseRefusalError
from workers.rules.matching import (
    CandidateFacts,
    Decision,
    Preference,
    Reason,
    explain_rule,
    judge_preference,
)
from workers.rules.schedule import (
    PlannedSession,
)
from workers.stages.contract import (
    Outcome,
    Results,
    Stage,
    StageContext,
    StageSpec,
    together_or_one_by_one,
)
from workers.stages.search import (
    allocate_best,
    approve,
    remaining_plan,
    search,
    search_ranked,
    slot_text,
    still_fits,
)

log = logging.getLogger(__name__)

# Rules an admin override may set aside. Never: an inactive trainer, or a trainer who is
# elsewhere at that time (the exclusion constraint would refuse it anyway).
OVERRIDABLE = frozenset(
    {
        Reason.NO_SPECIALTY,
        Reason.GENDER_MISMATCH,
        Reason.OUT_OF_RANGE,
        Reason.TOO_FAR_BETWEEN_SESSIONS,
        Reason.AT_CAPACITY,
    }
)


async def handle(conn: AsyncConn, refs: list[UUID], ctx: StageContext) -> Results:
    """Purchases one after the other. The worker gives this stage one purchase per
    transaction (`SPEC.one_transaction_per_row`), so a trainer's lock is held only while
    one purchase books them; given several in one transaction, a later purchase sees the
    trainers the earlier ones took, and when one raises, every one runs again in a savepoint
    of its own so that only that one fails. (The lock order above is that of one purchase
    per transaction: with several, a trainer kept for one is held while the next purchase's
    row is locked.)"""
    return await together_or_one_by_one(conn, sorted(refs), ctx, together=_in_turn, one=allocate)


# Each purchase commits on its own, its job done (and its place among the worker's claimed
# jobs free) as soon as it commits. The stage holds a trainer's lock from the re-check to the
# commit: in a transaction for the whole batch, every trainer a batch booked stayed locked
# until the batch ended, so other batches passed over the best trainer or waited for it. And a
# batch of 20 rows whose jobs were all done only when the last was kept the worker's places
# taken, while the sessions of approved purchases waited for one (issue 22).
SPEC = StageSpec(Stage.ALLOCATION, handle, one_transaction_per_row=True)


async def _in_turn(conn: AsyncConn, refs: list[UUID], ctx: StageContext) -> Results:
    return {ref: await allocate(conn, ref, ctx) for ref in refs}


async def allocate(conn: AsyncConn, purchase_id: UUID, ctx: StageContext) -> Outcome:
    locked = await fetch_one(conn, q("lock_purchase_for_allocation"), {"purchase_id": purchase_id})
    if locked is None:
        return Outcome("skipped", "purchase does not exist")
    flags = await fetch_one(conn, q("purchase_flags"), {"purchase_id": purchase_id})
    assert flags is not None
    purchase: DictRow = {**locked, **flags}
    request = (
        await fetch_one(conn, q("open_request"), {"purchase_id": purchase_id})
        if purchase["has_request"]
        else None
    )
    if not purchase["is_active"]:
        if request is not None:
            await _close_request(conn, request, "refused", "the purchase is not active", None)
        return Outcome("skipped", "purchase is not active")

    holidays = await ctx.holidays(conn, purchase["start_date"])
    if request is not None:
        return await carry_out_request(conn, purchase, request, holidays, ctx)
    from workers.stages import lifecycle  # built on this module: reschedules, trainers who left

    if (changed := await lifecycle.before_allocation(conn, purchase, holidays, ctx)) is not None:
        return changed
    if purchase["live_allocation_status"] == "approved":
        return await extend_if_short(conn, purchase, holidays, ctx)

    sessions = await remaining_plan(conn, purchase, replacing=None, holidays=holidays)
    if not sessions:
        return Outcome("skipped", "no sessions remain to be scheduled")
    if purchase["preferred_trainer_id"] is None:
        # Rank first, then check: usually one query measuring a few trainers. When every
        # trainer it found eligible is taken meanwhile, the full search supplies the rest.
        decision = await search_ranked(conn, purchase, sessions, ctx)
        return await allocate_best(
            conn,
            purchase,
            sessions,
            decision,
            replacing=None,
            everyone=lambda: search(conn, purchase, sessions, ctx),
        )
    # The student's choice is judged by every rule and ranked among everyone: the full search.
    decision = await search(conn, purchase, sessions, ctx)
    preference = await preferred_trainer(conn, purchase, sessions, decision, ctx)
    return await allocate_best(
        conn, purchase, sessions, decision, replacing=None, preference=preference
    )


async def preferred_trainer(
    conn: AsyncConn,
    purchase: DictRow,
    sessions: list[PlannedSession],
    decision: Decision,
    ctx: StageContext,
) -> Preference | None:
    """The student's choice (payment metadata trainerId) judged by every rule. The search
    measured them already when they are active and teach the course; otherwise they are
    measured alone, so the allocation can say which rule they fail."""
    trainer_id: UUID | None = purchase["preferred_trainer_id"]
    if trainer_id is None:
        return None
    facts = next((c for c in decision.candidates if c.trainer_id == trainer_id), None)
    if facts is None:
        alone = await search(conn, purchase, sessions, ctx, only=trainer_id)
        facts = next(iter(alone.candidates), None)
    return judge_preference(
        trainer_id, facts, course=purchase["course_title"], slot=slot_text(purchase)
    )


async def extend_if_short(
    conn: AsyncConn, purchase: DictRow, holidays: set[date], ctx: StageContext
) -> Outcome:
    """An approved allocation short of sessions (the tier was raised): the same trainer
    takes the extra sessions when free; otherwise the remainder moves to the best trainer."""
    live_id = purchase["live_allocation_id"]
    extra = await remaining_plan(conn, purchase, replacing=None, holidays=holidays)
    if not extra:
        return Outcome("skipped", f"allocation {live_id} is approved and fully scheduled")
    unscheduled = await fetch_one(conn, q("count_allocation_sessions"), {"allocation_id": live_id})
    if unscheduled is not None and unscheduled["n"] == 0:
        return Outcome("skipped", f"allocation {live_id} is approved; its sessions are queued")
    if (
        await still_fits(conn, purchase["live_trainer_id"], purchase, extra, ignore_capacity=True)
        is None
    ):
        await conn.execute(q("enqueue_sessions"), {"allocation_id": live_id})
        return Outcome(
            "succeeded",
            f"{len(extra)} more session{'' if len(extra) == 1 else 's'} for allocation {live_id}, "
            f"same trainer {purchase['live_trainer_id']}",
        )
    remainder = await remaining_plan(conn, purchase, replacing=live_id, holidays=holidays)
    decision = await search(conn, purchase, remainder, ctx, exclude=purchase["live_trainer_id"])
    return await allocate_best(conn, purchase, remainder, decision, replacing=live_id)


async def carry_out_request(
    conn: AsyncConn,
    purchase: DictRow,
    request: DictRow,
    holidays: set[date],
    ctx: StageContext,
) -> Outcome:
    """An admin's assign_trainer(): every rule is checked. An override request sets aside
    the rules in OVERRIDABLE that fail (all of them are recorded), never the others. A write
    the database refuses closes the request as refused, with the database's reason."""
    trainer_id: UUID = request["trainer_id"]
    live_id = purchase["live_allocation_id"]
    approved = purchase["live_allocation_status"] == "approved"
    if approved and purchase["live_trainer_id"] == trainer_id:
        await _close_request(conn, request, "done", "already assigned to this trainer", live_id)
        return Outcome("skipped", f"trainer {trainer_id} is already assigned")

    sessions = await remaining_plan(
        conn, purchase, replacing=live_id if approved else None, holidays=holidays
    )
    if not sessions:
        await _close_request(conn, request, "refused", "no sessions remain to be scheduled", None)
        return Outcome("skipped", "no sessions remain to be scheduled")
    decision = await search(conn, purchase, sessions, ctx, only=trainer_id)
    [candidate] = [c for c in decision.candidates if c.trainer_id == trainer_id]
    overridden, blocking = _judge_request(request, candidate)
    if blocking:
        why = "; ".join(
            explain_rule(rule, candidate, course=purchase["course_title"], slot=slot_text(purchase))
            for rule in blocking
        )
        return await _refuse(conn, request, why)
    decision = Decision((candidate,), None, "", decision.eliminated, decision.candidates)
    return await _assign(conn, purchase, request, sessions, decision, overridden)


def _judge_request(
    request: DictRow, trainer: CandidateFacts
) -> tuple[tuple[Reason, ...], list[Reason]]:
    """(the rules an override sets aside, the rules that refuse the request)."""
    failed = trainer.failed_rules()
    overridden = failed if request["override"] else ()
    blocking = [rule for rule in failed if rule not in OVERRIDABLE or rule not in overridden]
    return overridden, blocking


async def _assign(
    conn: AsyncConn,
    purchase: DictRow,
    request: DictRow,
    sessions: list[PlannedSession],
    decision: Decision,
    overridden: tuple[Reason, ...],
) -> Outcome:
    """Write the admin's choice (decision.chosen), replacing the live allocation, and close the
    request: done; refused when the trainer was taken meanwhile, or with the database's words
    when a constraint refuses it (the live allocation then stands)."""
    trainer = decision.ranked[0]
    assignment = {
        "requestId": request["id"],
        "override": bool(overridden),
        # The first rule set aside (older readers), then every one of them.
        "overriddenRule": overridden[0].value if overridden else None,
        "overriddenRules": [rule.value for rule in overridden],
        "note": request["note"],
    }
    approved = purchase["live_allocation_status"] == "approved"
    replacing = purchase["live_allocation_id"] if approved else None
    over_capacity = Reason.AT_CAPACITY in overridden
    allocation_id: UUID | None = None
    try:
        async with savepoint_or_refusal(conn):
            taken = await still_fits(
                conn,
                trainer.trainer_id,
                purchase,
                sessions,
                ignore_capacity=over_capacity,
                replacing=replacing,
                ending=f"reassigned by request {request['id']} to trainer {trainer.trainer_id}",
            )
            if taken is None:
                allocation_id = await approve(
                    conn,
                    purchase,
                    sessions,
                    decision,
                    trainer,
                    replacing=replacing,
                    capacity_override=over_capacity,
                    assignment=assignment,
                )
    except DatabaseRefusalError as exc:
        return await _refuse(conn, request, f"refused by the database: {exc}")
    if taken is not None:
        return await _refuse(conn, request, f"{taken.value}: taken meanwhile")
    await _close_request(conn, request, "done", f"allocation {allocation_id}", allocation_id)
    return Outcome(
        "succeeded",
        f"allocation {allocation_id} approved by request {request['id']}: "
        f"trainer {trainer.trainer_id}",
    )


async def _refuse(conn: AsyncConn, request: DictRow, why: str) -> Outcome:
    await _close_request(conn, request, "refused", why, None)
    return Outcome("succeeded", f"assignment request {request['id']} refused: {why}")


async def _close_request(
    conn: AsyncConn, request: DictRow, status: str, outcome: str, allocation_id: UUID | None
) -> None:
    await conn.execute(
        q("close_request"),
        {
            "request_id": request["id"],
            "status": status,
            "outcome": outcome,
            "allocation_id": allocation_id,
        },
    )
