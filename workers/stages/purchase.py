"""Purchase stage: a succeeded payment -> exactly one student_course_purchases row.

Idempotent: the payment row is locked and an existing purchase (or upgrade) ends the job.
Metadata that cannot make a purchase is recorded in payment_rejections (visible in
rejected_payments) and the job ends there: no retry loop, nothing lost. Correcting
payments.metadata re-enqueues it (the payments trigger).

An upgrade payment (`upgrade: true`, larger sessionCount) raises the tier of the student's
active purchase of the course; the tier trigger asks the allocation stage for the extra
sessions.
"""

from __future__ import annotations

import logging
from datetime import datetime
from uuid import UUID
from zoneinfo import ZoneInfo

from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from workers.database.connections import AsyncConn, fetch_one
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
from workers.runtime.runner import Outcome, StageContext, load_holidays

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


async def handle(conn: AsyncConn, payment_id: UUID, ctx: StageContext) -> Outcome:
    payment = await fetch_one(
        conn, q("lock_payment"), {"payment_id": payment_id, "max_bytes": MAX_METADATA_BYTES}
    )
    if payment is None:
        return Outcome("skipped", "payment does not exist")
    if payment["purchase_id"] is not None:
        return Outcome("skipped", f"purchase {payment['purchase_id']} already exists")
    if payment["upgraded_purchase_id"] is not None:
        return Outcome("skipped", f"purchase {payment['upgraded_purchase_id']} already upgraded")
    if payment["status"] != "succeeded":
        return Outcome("skipped", f"payment is {payment['status']}, not succeeded")

    try:
        outcome = await _create(conn, payment, ctx)
    except InvalidPurchaseError as exc:
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
    await conn.execute(q("resolve_rejection"), {"payment_id": payment_id})
    return outcome


async def _create(conn: AsyncConn, payment: DictRow, ctx: StageContext) -> Outcome:
    plan = await _plan(conn, payment, ctx)
    if plan.upgrade:
        return await _upgrade(conn, payment, plan)
    row = await fetch_one(
        conn,
        q("insert_purchase"),
        {
            "payment_id": payment["id"],
            "student_id": payment["student_id"],
            "course_id": payment["course_id"],
            "tier": plan.session_count,
            "start_date": plan.start_date,
            "time_slot": plan.time_slot,
            "schedule_mode": plan.schedule_mode.value,
            "duration": plan.session_duration,
            "defaults_applied": list(plan.defaults_applied),
            "learning_mode": plan.learning_mode.value,
            "group_size": plan.group_size,
            "preferred_trainer_id": plan.preferred_trainer_id,
            "unused_top": list(plan.unused_top),
            "unused_schedule": list(plan.unused_schedule),
            "unused_keys": list(plan.unused_keys),
        },
    )
    if row is None:
        active = await fetch_one(
            conn,
            q("active_purchase_for"),
            {"student_id": payment["student_id"], "course_id": payment["course_id"]},
        )
        detail = f"purchase {active['id']} (payment {active['payment_id']})" if active else "?"
        raise InvalidPurchaseError(
            RejectReason.ACTIVE_PURCHASE_EXISTS,
            [
                {
                    "field": "payment",
                    "message": "the student already has an active purchase of this course: "
                    f"{detail}; send upgrade: true to extend it",
                }
            ],
        )
    return Outcome("succeeded", f"purchase {row['id']}")


async def _plan(conn: AsyncConn, payment: DictRow, ctx: StageContext) -> PurchasePlan:
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
            holidays=await load_holidays(conn, today),
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
