"""The trainer search and booking, shared by the allocation stage and the lifecycle (moves away
from a trainer who left, reschedules): plan the sessions still owed (`remaining_plan`),
measure and rank the trainers (`search`, the full "explain everyone" search, and
`search_ranked`, rank first then check), and book the first who still fits under their lock
(`allocate_best`, `still_fits`, `write_allocation`).

Lock order (no two allocations ever wait for each other in a circle): the purchase's row
first (the caller's); then whatever the purchase's own change writes before a trainer is
chosen (ending the allocation being replaced, and the retries of waiting purchases that this
enqueues); then one trainer's lock at a time, each taken in a savepoint (`still_fits`) that
is rolled back when the trainer does not fit, so the lock is released before the next
trainer's is asked for. Once a trainer's lock is kept, the transaction only writes its own
allocation and enqueues its sessions (a job no other transaction can be enqueuing), then
commits. A transaction waiting for a trainer therefore holds no trainer's lock, and the one
holding it waits for nobody (tests/processes/test_allocation_scarce_trainers.py runs real
workers against this).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time
from itertools import pairwise
from typing import Any, Literal, overload
from uuid import UUID

from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from workers.database.connections import (
    AsyncConn,
    fetch_all,
    fetch_one,
    fetch_tuples,
    kept_if,
)
from workers.database.sql import q
from workers.errors import DatabaseRefusalError
from workers.rules.matching import (
    CandidateFacts,
    Decision,
    Preference,
    RankedSearch,
    Reason,
    capacity_for,
    decide,
    furthest,
    sentence_for,
    try_order,
)
from workers.rules.metadata import learnings_metadata
from workers.rules.schedule import (
    Delivery,
    LearningMode,
    PlannedSession,
    ScheduleMode,
    allowed_weekdays,
    local_tomorrow,
    plan_sessions,
    resume_from,
    slot_end,
)
from workers.stages.contract import (
    Outcome,
    StageContext,
    load_holidays,
)

log = logging.getLogger(__name__)


async def remaining_plan(
    conn: AsyncConn, purchase: DictRow, *, replacing: UUID | None, holidays: set[date]
) -> list[PlannedSession]:
    """The sessions still owed: after the last standing one, never before tomorrow."""
    if replacing is None and purchase.get("has_sessions") is False:
        progress: dict[str, Any] = {"delivered": 0, "last_number": 0, "last_date": None}
    else:
        row = await fetch_one(
            conn, q("purchase_progress"), {"purchase_id": purchase["id"], "replacing": replacing}
        )
        assert row is not None
        progress = row
    remaining = purchase["purchase_tier"] - progress["delivered"]
    if remaining <= 0:
        return []
    tomorrow = local_tomorrow(purchase["timezone"], datetime.now(UTC))
    return plan_sessions(
        purchase,
        earliest=resume_from(max(purchase["start_date"], tomorrow), progress["last_date"]),
        count=remaining,
        first_number=progress["last_number"] + 1,
        holidays=holidays,
    )


def _overlaps(a: list[PlannedSession], b: list[PlannedSession]) -> bool:
    spans = sorted([(s.starts_at, s.ends_at) for s in a] + [(s.starts_at, s.ends_at) for s in b])
    return any(nxt[0] < cur[1] for cur, nxt in pairwise(spans))


async def allocate_best(
    conn: AsyncConn,
    purchase: DictRow,
    sessions: list[PlannedSession],
    decision: Decision,
    *,
    replacing: UUID | None,
    preference: Preference | None = None,
    everyone: Callable[[], Awaitable[Decision]] | None = None,
) -> Outcome:
    """Book the first ranked trainer (the student's choice first, when eligible) who still
    fits under their row lock. When nobody does, the purchase waits in its one pending row,
    with the reason; an allocation being replaced (`replacing`) is kept instead.

    A rank-first decision (`decision.partial`) holds only the top of the ranking: when every
    eligible trainer in it is taken or held by another transaction, `everyone` (the full
    search) supplies the rest of the ranking, tried in the same way before any held one is
    waited for."""
    lost: list[Reason] = []
    held: list[CandidateFacts] = []  # locked by another transaction when tried
    tried: set[UUID] = set()
    queue = try_order(decision, preference)
    waiting = False
    while True:
        for candidate in list(queue):
            tried.add(candidate.trainer_id)
            chosen = preference is not None and candidate.trainer_id == preference.trainer_id
            # The student's choice is waited for; another trainer a concurrent transaction
            # holds is passed over for now and waited for only when every free one failed.
            why = await still_fits(
                conn,
                candidate.trainer_id,
                purchase,
                sessions,
                wait=waiting or chosen,
                replacing=replacing,
                ending=f"the schedule moved to trainer {candidate.trainer_id}",
            )
            if why is HELD:
                held.append(candidate)
                continue
            if why is None:
                allocation_id = await approve(
                    conn,
                    purchase,
                    sessions,
                    decision,
                    candidate,
                    replacing=replacing,
                    preference=preference,
                )
                return Outcome(
                    "succeeded",
                    f"allocation {allocation_id} approved: trainer {candidate.trainer_id}",
                )
            assert isinstance(why, Reason)
            lost.append(why)
            if chosen and preference is not None:
                preference = Preference(
                    candidate.trainer_id,
                    why.value,
                    f"{why.value}: taken by another purchase between the search and the booking",
                )
            log.info(
                "trainer %s no longer fits purchase %s (%s); trying the next",
                candidate.trainer_id,
                purchase["id"],
                why.value,
            )
        if not waiting and decision.partial and everyone is not None:
            decision, everyone = await everyone(), None
            queue = [c for c in try_order(decision, preference) if c.trainer_id not in tried]
            continue
        if waiting:
            break
        waiting, queue = True, held
    if lost:  # every ranked trainer was taken by another purchase after the search
        decision = all_taken(decision, lost, purchase)
    if replacing is not None:
        return Outcome(
            "succeeded",
            f"allocation {replacing} kept; no trainer can take the "
            f"extra sessions: {decision.reason}",
        )
    allocation_id = await write_allocation(
        conn,
        purchase,
        sessions,
        status="pending",
        trainer=None,
        decision=decision,
        live_pending=True,
        preference=preference,
    )
    return Outcome("succeeded", f"allocation {allocation_id} pending: {decision.reason}")


async def approve(
    conn: AsyncConn,
    purchase: DictRow,
    sessions: list[PlannedSession],
    decision: Decision,
    trainer: CandidateFacts,
    *,
    replacing: UUID | None,
    preference: Preference | None = None,
    capacity_override: bool = False,
    assignment: dict[str, Any] | None = None,
) -> UUID:
    """`trainer` (whose lock `still_fits` kept, having ended the allocation being replaced)
    takes the sessions: the approved row is written (a pending one updated in place)."""
    return await write_allocation(
        conn,
        purchase,
        sessions,
        status="approved",
        trainer=trainer,
        decision=decision,
        live_pending=replacing is None,
        capacity_override=capacity_override,
        assignment=assignment,
        preference=preference,
    )


def all_taken(decision: Decision, lost: list[Reason], purchase: DictRow) -> Decision:
    """Nobody left after the re-checks: the purchase waits for the furthest rule they lost on."""
    reason = furthest(lost)
    sentence = sentence_for(
        reason, n=len(lost), course=purchase["course_title"], slot=slot_text(purchase)
    )
    return Decision((), reason, sentence, decision.eliminated, decision.candidates)


def slot_text(purchase: DictRow) -> str:
    slot: time = purchase["preferred_time_slot"]
    return slot.strftime("%H:%M")


async def search(
    conn: AsyncConn,
    purchase: DictRow,
    sessions: list[PlannedSession],
    ctx: StageContext,
    *,
    only: UUID | None = None,
    exclude: UUID | None = None,
) -> Decision:
    """The full search ("explain everyone"): every trainer within reach measured and decided
    on (an admin's or a student's choice, reschedules and moves, and the rest of the ranking
    when a rank-first winner was taken). When nobody is eligible, the trainers beyond reach
    are counted too (a second, cheap query), so that the pending sentence and the eliminated
    counts name everyone who teaches the course."""
    near = await _candidates(conn, purchase, sessions, ctx, only, exclude, count_far=False)
    course, slot = purchase["course_title"], slot_text(purchase)
    decision = decide(near, active_trainers=len(near), course=course, slot=slot)
    if decision.chosen is not None:
        return decision
    far = (
        await _candidates(conn, purchase, sessions, ctx, only, exclude, count_far=True)
        if only is None
        else []
    )
    # Whether any trainer is active at all matters only now.
    row = await fetch_one(conn, q("count_active_trainers"), {})
    active = row["active"] if row else 0
    return decide(near + far, active_trainers=active, course=course, slot=slot)


# Rank first, then check: the first query measures the costly rules for this many trainers
# at the top of the ranking; each further one for BATCH_GROWTH times as many as the one
# before, so a search where nobody fits measures everyone within reach in a few queries.
FIRST_BATCH = 8
BATCH_GROWTH = 4


async def search_ranked(
    conn: AsyncConn, purchase: DictRow, sessions: list[PlannedSession], ctx: StageContext
) -> Decision:
    """The same winner as `search` (the best by rank_key among the eligible), measuring the
    costly rules only for the trainers at the top of the ranking, a batch at a time, until
    one passes every rule. When nobody does, everyone within reach has been measured, and
    the decision (reason, counts, sentence) is the full search's."""
    course, slot = purchase["course_title"], slot_text(purchase)
    measured: list[CandidateFacts] = []
    places: dict[UUID, int] = {}
    skip, take, batches, ranked = 0, FIRST_BATCH, 0, 0
    while True:
        for facts, place, total in await _ranked_candidates(
            conn, purchase, sessions, ctx, skip=skip, take=take
        ):
            measured.append(facts)
            if place > 0:  # a trainer (0: a group row, out at a cheap rule)
                places[facts.trainer_id] = place
                ranked = total
        batches += 1
        skip += take
        exhaustive = skip >= ranked
        decision = decide(measured, active_trainers=len(measured), course=course, slot=slot)
        if decision.chosen is not None or exhaustive:
            break
        take *= BATCH_GROWTH
    how = RankedSearch(ranked=ranked, places=places, batches=batches, exhaustive=exhaustive)
    if decision.chosen is None:
        # As `search`: the trainers beyond reach are counted, and whether anyone is active.
        far = await _candidates(conn, purchase, sessions, ctx, None, None, count_far=True)
        row = await fetch_one(conn, q("count_active_trainers"), {})
        active = row["active"] if row else 0
        decision = decide(measured + far, active_trainers=active, course=course, slot=slot)
    return dataclasses.replace(decision, search=how)


async def _ranked_candidates(
    conn: AsyncConn,
    purchase: DictRow,
    sessions: list[PlannedSession],
    ctx: StageContext,
    *,
    skip: int,
    take: int,
) -> list[tuple[CandidateFacts, int, int]]:
    """Places skip+1 .. skip+take of the ranking, measured: (facts, place, ranking length);
    with skip = 0, also the group rows of those within reach out at a cheap rule."""
    columns, rows = await fetch_tuples(
        conn,
        q("ranked_candidate_facts"),
        _search_params(purchase, sessions, ctx) | {"skip": skip, "take": take},
    )
    n = len(columns) - 2
    facts = CandidateFacts.from_rows(columns[:n], (row[:n] for row in rows))
    return [(f, int(row[n]), int(row[n + 1])) for f, row in zip(facts, rows, strict=True)]


def _search_params(
    purchase: DictRow, sessions: list[PlannedSession], ctx: StageContext
) -> dict[str, Any]:
    slot: time = purchase["preferred_time_slot"]
    # A session that ends exactly at midnight needs availability until 24:00.
    end = slot_end(slot, purchase["session_duration_minutes"]) or "24:00"
    return {
        "purchase_id": purchase["id"],
        "starts": [s.starts_at for s in sessions],
        "ends": [s.ends_at for s in sessions],
        "at_home": [s.delivery is Delivery.HOME for s in sessions],
        "weekdays": sorted(allowed_weekdays(ScheduleMode(purchase["schedule_mode"]))),
        "slot_start": slot,
        "slot_end": end,
    }


async def _candidates(
    conn: AsyncConn,
    purchase: DictRow,
    sessions: list[PlannedSession],
    ctx: StageContext,
    only: UUID | None,
    exclude: UUID | None,
    *,
    count_far: bool,
) -> list[CandidateFacts]:
    """The trainers within reach, measured; with count_far, only the group rows of those
    beyond it."""
    columns, rows = await fetch_tuples(
        conn,
        q("candidate_facts"),
        _search_params(purchase, sessions, ctx) | {"only_trainer": only, "count_far": count_far},
    )
    return [c for c in CandidateFacts.from_rows(columns, rows) if c.trainer_id != exclude]


class _Held:
    """still_fits' answer for a trainer whose lock another transaction holds (wait=False)."""


HELD = _Held()


@overload
async def still_fits(
    conn: AsyncConn,
    trainer_id: UUID,
    purchase: DictRow,
    sessions: list[PlannedSession],
    *,
    ignore_capacity: bool = False,
    wait: Literal[True] = True,
    replacing: UUID | None = None,
    ending: str = "",
) -> Reason | None: ...
@overload
async def still_fits(
    conn: AsyncConn,
    trainer_id: UUID,
    purchase: DictRow,
    sessions: list[PlannedSession],
    *,
    ignore_capacity: bool = False,
    wait: bool,
    replacing: UUID | None = None,
    ending: str = "",
) -> Reason | _Held | None: ...
async def still_fits(
    conn: AsyncConn,
    trainer_id: UUID,
    purchase: DictRow,
    sessions: list[PlannedSession],
    *,
    ignore_capacity: bool = False,
    wait: bool = True,
    replacing: UUID | None = None,
    ending: str = "",
) -> Reason | _Held | None:
    """None when the trainer is active, under capacity and free at every session: their lock
    is then held until the transaction ends. Otherwise the rule that now fails (or HELD: with
    wait=False, another transaction holds the lock), and the lock is released again: the
    check runs in a savepoint that is rolled back, so a transaction never holds one trainer's
    lock while it waits for another's (the module's lock order).

    `replacing`: the allocation that the trainer's would replace ends first (`ending` says
    why; its future sessions are cancelled), before the lock is taken; rolled back with it.
    """

    async def check() -> Reason | _Held | None:
        if replacing is not None:
            await conn.execute(
                q("replace_allocation"), {"allocation_id": replacing, "detail": ending}
            )
        return await _recheck(
            conn, trainer_id, purchase, sessions, ignore_capacity=ignore_capacity, wait=wait
        )

    return await kept_if(conn, check, lambda why: why is None)


async def _recheck(
    conn: AsyncConn,
    trainer_id: UUID,
    purchase: DictRow,
    sessions: list[PlannedSession],
    *,
    ignore_capacity: bool,
    wait: bool,
) -> Reason | _Held | None:
    """Under the trainer's lock, what may have changed since the search.

    Time promised to approved allocations whose sessions are not written yet is read before
    the written sessions: a sessions stage committing between the two reads then shows up in
    the second, never in neither.
    """
    if wait:
        await conn.execute(q("lock_trainer"), {"trainer_id": trainer_id})
    else:
        locked = await fetch_one(conn, q("try_lock_trainer"), {"trainer_id": trainer_id})
        if locked is None or not locked["locked"]:
            return HELD
    promised = await fetch_all(
        conn,
        q("trainer_unscheduled_allocations"),
        {"trainer_id": trainer_id, "purchase_id": purchase["id"]},
    )
    row = await fetch_one(
        conn,
        q("recheck_trainer"),
        {
            "trainer_id": trainer_id,
            "starts": [s.starts_at for s in sessions],
            "ends": [s.ends_at for s in sessions],
        },
    )
    if row is None or row["status"] != "active":
        return Reason.TRAINER_INACTIVE
    if not ignore_capacity and row["live_allocations"] >= capacity_for(row["rating"]):
        return Reason.AT_CAPACITY
    if row["overlapping_sessions"] > 0:
        return Reason.NO_FREE_SLOT
    # Days before a schedule's first day do not change it: one read serves them all.
    days_off = (
        await load_holidays(conn, min(other["first_session_date"] for other in promised))
        if promised
        else set()
    )
    for other in promised:
        theirs = plan_sessions(
            other,
            earliest=other["first_session_date"],
            count=other["purchase_tier"],
            first_number=1,
            holidays=days_off,
        )
        if _overlaps(sessions, theirs):
            return Reason.NO_FREE_SLOT
    return None


async def write_allocation(
    conn: AsyncConn,
    purchase: DictRow,
    sessions: list[PlannedSession],
    *,
    status: str,
    trainer: CandidateFacts | None,
    decision: Decision,
    live_pending: bool,
    capacity_override: bool = False,
    assignment: dict[str, Any] | None = None,
    preference: Preference | None = None,
) -> UUID:
    first_day = sessions[0].local_date
    metadata = learnings_metadata(
        session_count=purchase["purchase_tier"],
        time_slot=purchase["preferred_time_slot"],
        first_day=first_day,
        mode=ScheduleMode(purchase["schedule_mode"]),
        group_size=purchase["group_size"],
        learning_mode=LearningMode(purchase["learning_mode"]),
    )
    metadata["schedule"] |= {
        "durationMinutes": purchase["session_duration_minutes"],
        "sessionCount": purchase["purchase_tier"],
        "firstNumber": sessions[0].number,
        "lastDate": sessions[-1].local_date.isoformat(),
        "online": sum(s.delivery is Delivery.ONLINE for s in sessions),
        "atHome": sum(s.delivery is Delivery.HOME for s in sessions),
    }
    metadata["match"] = decision.explain(trainer)
    if preference is not None:
        metadata["preferredTrainer"] = preference.summary(trainer.trainer_id if trainer else None)
    if assignment is not None:
        metadata["assignment"] = assignment
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
        "capacity_override": capacity_override,
        "allocation_id": purchase["live_allocation_id"],
    }
    pending_id = purchase["live_allocation_id"]
    if live_pending and pending_id is not None and purchase["live_allocation_status"] == "pending":
        row = await fetch_one(conn, q("update_pending_allocation"), params)
    else:
        row = await fetch_one(conn, q("insert_allocation"), params)
    if row is None:
        raise DatabaseRefusalError(
            f"allocation for purchase {purchase['id']} changed under its lock"
        )
    return UUID(str(row["id"]))
