"""Purchase stage: a succeeded payment -> exactly one student_course_purchases row.

Idempotent: the payment row is locked and an existing purchase (or upgrade) ends the job.
A batch of payments is locked by one statement and its new purchases written by another.
Metadata that cannot make a purchase is recorded in payment_rejections (visible in
rejected_payments) and the job ends there: no retry loop, nothing lost. Correcting
payments.metadata re-enqueues it (the payments trigger).

An upgrade payment (`upgrade: true`, larger sessionCount) raises the tier of the student's
active purchase of the course; the tier trigger asks the allocation stage for the extra
sessions.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from uuid import UUID
from zoneinfo import ZoneInfo

from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from workers.database.connections import AsyncConn, fetch_all, fetch_one
from workers.database.sql import q
from workers.errors import InvalidPurchaseError, InvalidTimezoneError, ScheduleError
from workers.rules.metadata import (
    MAX_METADATA_BYTES,
    PurchasePlan,
    RejectReason,
    decode_metadata,
    plan_purchase,
)
from workers.rules.schedule import zone_named
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

log = logging.getLogger(__name__)


def zone_or_rejection(name: str) -> ZoneInfo:
    """The student's IANA zone, or a rejection naming the students row's value (before the
    purchase exists, a bad zone rejects the payment; after, `schedule.student_zone` fails
    the job)."""
    try:
        return zone_named(name)
    except InvalidTimezoneError as exc:
        raise InvalidPurchaseError(
            RejectReason.INVALID_TIMEZONE, [{"field": "students.timezone", "message": str(exc)}]
        ) from None


async def handle(conn: AsyncConn, refs: list[UUID], ctx: StageContext) -> Results:
    return await together_or_one_by_one(conn, refs, ctx, together=_together, one=one_of(_together))


SPEC = StageSpec(Stage.PURCHASE, handle)


async def _together(conn: AsyncConn, refs: list[UUID], ctx: StageContext) -> Results:
    """A batch of payments: locked by one statement, planned here, the new purchases written
    by one statement; upgrades and rejections (rare) one by one in the same transaction."""
    payments = await fetch_all(
        conn, q("lock_payments"), {"payment_ids": refs, "max_bytes": MAX_METADATA_BYTES}
    )
    by_id = {payment["id"]: payment for payment in payments}
    # Every student's today lies within a day of today in UTC.
    holidays = await load_holidays(conn, datetime.now(UTC).date() - timedelta(days=1))
    results: Results = {}
    new: list[tuple[DictRow, PurchasePlan]] = []
    upgrades: list[tuple[DictRow, PurchasePlan]] = []
    for ref in refs:
        payment = by_id.get(ref)
        if (skipped := _skipped(payment)) is not None:
            results[ref] = skipped
            continue
        assert payment is not None
        try:
            plan = _plan(payment, holidays, ctx)
        except InvalidPurchaseError as exc:
            results[ref] = await _reject(conn, ref, exc)
            continue
        (upgrades if plan.upgrade else new).append((payment, plan))
    created = await _insert(conn, new)
    for payment, _ in new:
        purchase_id = created.get(payment["id"])
        if purchase_id is not None:
            results[payment["id"]] = Outcome("succeeded", f"purchase {purchase_id}")
        else:
            results[payment["id"]] = await _reject(
                conn, payment["id"], await _active(conn, payment)
            )
    # After the new purchases: an upgrade paid right after its purchase may share the batch.
    for payment, plan in upgrades:
        try:
            results[payment["id"]] = await _upgrade(conn, payment, plan)
        except InvalidPurchaseError as exc:
            results[payment["id"]] = await _reject(conn, payment["id"], exc)
    succeeded = [
        ref for ref, r in results.items() if isinstance(r, Outcome) and r.event == "succeeded"
    ]
    if succeeded:
        await conn.execute(q("resolve_rejections"), {"payment_ids": succeeded})
    return results


def _skipped(payment: DictRow | None) -> Outcome | None:
    if payment is None:
        return Outcome("skipped", "payment does not exist")
    if payment["purchase_id"] is not None:
        return Outcome("skipped", f"purchase {payment['purchase_id']} already exists")
    if payment["upgraded_purchase_id"] is not None:
        return Outcome("skipped", f"purchase {payment['upgraded_purchase_id']} already upgraded")
    if payment["status"] != "succeeded":
        return Outcome("skipped", f"payment is {payment['status']}, not succeeded")
    return None


async def _reject(conn: AsyncConn, payment_id: UUID, exc: InvalidPurchaseError) -> Outcome:
    await conn.execute(
        q("record_rejection"),
        {
            "payment_id": payment_id,
            "reason": exc.reason,
            "errors": Jsonb(exc.errors),
            "keep_metadata": exc.keep_metadata,
        },
    )
    return Outcome("rejected", str(exc)[:2000])


async def _insert(conn: AsyncConn, new: list[tuple[DictRow, PurchasePlan]]) -> dict[UUID, UUID]:
    """The new purchases in one statement; payment id -> purchase id for those written (a
    payment missing from it conflicts with an active purchase of the same course)."""
    if not new:
        return {}
    plans = [plan for _, plan in new]
    rows = await fetch_all(
        conn,
        q("insert_purchases"),
        {
            "payment_ids": [payment["id"] for payment, _ in new],
            "tiers": [plan.session_count for plan in plans],
            "start_dates": [plan.start_date for plan in plans],
            "time_slots": [plan.time_slot for plan in plans],
            "schedule_modes": [plan.schedule_mode.value for plan in plans],
            "durations": [plan.session_duration for plan in plans],
            "learning_modes": [plan.learning_mode.value for plan in plans],
            "group_sizes": [plan.group_size for plan in plans],
            "preferred_trainer_ids": [plan.preferred_trainer_id for plan in plans],
            "names": [
                Jsonb(
                    {
                        "defaults": list(plan.defaults_applied),
                        "top": list(plan.unused_top),
                        "schedule": list(plan.unused_schedule),
                        "keys": list(plan.unused_keys),
                    }
                )
                for plan in plans
            ],
        },
    )
    return {row["payment_id"]: row["id"] for row in rows}


async def _active(conn: AsyncConn, payment: DictRow) -> InvalidPurchaseError:
    """The rejection of a purchase the student already has, naming it."""
    active = await fetch_one(
        conn,
        q("active_purchase_for"),
        {"student_id": payment["student_id"], "course_id": payment["course_id"]},
    )
    detail = f"purchase {active['id']} (payment {active['payment_id']})" if active else "?"
    return InvalidPurchaseError(
        RejectReason.ACTIVE_PURCHASE_EXISTS,
        [
            {
                "field": "payment",
                "message": "the student already has an active purchase of this course: "
                f"{detail}; send upgrade: true to extend it",
            }
        ],
    )


def _plan(payment: DictRow, holidays: set[date], ctx: StageContext) -> PurchasePlan:
    """The payment's plan, or one rejection listing every problem: the student's time zone
    and the metadata's. With a zone that is no zone, the metadata is still checked (its
    dates against today in UTC, a day at most from the student's), so that fixing the zone
    does not reveal a second list."""
    bad_zone: InvalidPurchaseError | None = None
    try:
        zone = zone_or_rejection(str(payment["timezone"]))
    except InvalidPurchaseError as exc:
        bad_zone, zone = exc, ZoneInfo("UTC")
    today = datetime.now(zone).date()
    try:
        plan = plan_purchase(
            decode_metadata(payment["metadata_text"], payment["metadata_bytes"]),
            today=today,
            holidays={day for day in holidays if day >= today},
            default_time_slot=ctx.settings.default_time_slot,
        )
    except InvalidPurchaseError as bad_metadata:
        if bad_zone is None:
            raise
        raise InvalidPurchaseError(
            bad_zone.reason,
            bad_zone.errors + bad_metadata.errors,
            keep_metadata=bad_metadata.keep_metadata,
        ) from None
    except ScheduleError:
        if bad_zone is None:
            raise
        raise bad_zone from None  # a zone to fix first: the payment is rejected, not held
    if bad_zone is not None:
        raise bad_zone
    return plan


async def _upgrade(conn: AsyncConn, payment: DictRow, plan: PurchasePlan) -> Outcome:
    to_tier = plan.session_count
    active = await fetch_one(
        conn,
        q("lock_active_purchase"),
        {"student_id": payment["student_id"], "course_id": payment["course_id"]},
    )
    if active is None:
        raise InvalidPurchaseError(
            RejectReason.NO_PURCHASE_TO_UPGRADE,
            [
                {
                    "field": "upgrade",
                    "message": "the student has no active purchase of this course to upgrade; "
                    "send it without upgrade: true",
                }
            ],
        )
    if plan.learning_mode_given and plan.learning_mode != active["learning_mode"]:
        raise InvalidPurchaseError(
            RejectReason.UPGRADE_CHANGES_MODE,
            [
                {
                    "field": "learningMode",
                    "message": f"the purchase being upgraded is {active['learning_mode']}; an "
                    f"upgrade cannot make it {plan.learning_mode}",
                }
            ],
        )
    if to_tier <= active["purchase_tier"]:
        raise InvalidPurchaseError(
            RejectReason.UPGRADE_NOT_LARGER,
            [
                {
                    "field": "sessionCount",
                    "message": "an upgrade must be larger than the current "
                    f"{active['purchase_tier']} sessions, got {to_tier}",
                }
            ],
        )
    await conn.execute(
        q("apply_upgrade"),
        {
            "payment_id": payment["id"],
            "purchase_id": active["id"],
            "from_tier": active["purchase_tier"],
            "to_tier": to_tier,
        },
    )
    return Outcome(
        "succeeded",
        f"purchase {active['id']} upgraded from {active['purchase_tier']} to {to_tier} sessions",
    )
