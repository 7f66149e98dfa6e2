"""What every stage shares: the stage names, outcomes, the holidays, and the run-one-job
wrapper.

A stage handler runs inside one transaction and returns an Outcome; the wrapper writes the
history line in that same transaction, so "done" is recorded exactly when the work commits.
A handler that raises leaves nothing behind; the wrapper records the failure on its own
(`failed` in stage_history) and raises it on.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Literal
from uuid import UUID

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from workers.database.connections import AsyncConn, fetch_all, transaction
from workers.database.sql import q
from workers.settings import Settings

log = logging.getLogger(__name__)


class Stage(StrEnum):
    """Stage names: pgqueuer entrypoints, stage_history.stage and enqueue_stage's argument."""

    PURCHASE = "purchase"
    ALLOCATION = "allocation"
    SESSIONS = "sessions"


@dataclass(frozen=True)
class Outcome:
    event: Literal["succeeded", "skipped", "rejected"]
    detail: str


@dataclass(frozen=True)
class StageContext:
    settings: Settings
    job_id: int | None = None


Handler = Callable[[AsyncConn, UUID, StageContext], Awaitable[Outcome]]


async def load_holidays(conn: AsyncConn, from_day: date) -> set[date]:
    """The days without sessions (`holidays`), from `from_day` on: every stage that plans
    a schedule reads them here, in its own transaction."""
    rows = await fetch_all(conn, q("holidays_from"), {"from_day": from_day})
    return {row["day"] for row in rows}


async def run_stage(
    pool: AsyncConnectionPool[AsyncConn],
    stage: Stage,
    handler: Handler,
    ref: UUID,
    ctx: StageContext,
) -> Outcome:
    extra = {"stage": stage.value, "ref": str(ref), "job_id": ctx.job_id}
    try:
        async with transaction(pool) as conn:
            outcome = await handler(conn, ref, ctx)
            await conn.execute(
                q("record_history"),
                {
                    "stage": stage.value,
                    "ref_id": ref,
                    "event": outcome.event,
                    "job_id": ctx.job_id,
                    "detail": outcome.detail,
                    "error": None,
                },
            )
    except Exception as exc:
        # Logged once, with its traceback, by the caller that decides what happens next
        # (runtime.run_job: retried or held).
        await record_failure(pool, stage, ref, ctx, exc)
        raise
    log.info("%s %s %s: %s", stage.value, ref, outcome.event, outcome.detail, extra=extra)
    return outcome


async def record_failure(
    pool: AsyncConnectionPool[AsyncConn],
    stage: Stage,
    ref: UUID,
    ctx: StageContext,
    exc: BaseException,
) -> None:
    error = {
        "type": type(exc).__name__,
        "message": str(exc)[:2000],
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
    }
    try:
        async with transaction(pool) as conn:
            await conn.execute(
                q("record_history"),
                {
                    "stage": stage.value,
                    "ref_id": ref,
                    "event": "failed",
                    "job_id": ctx.job_id,
                    "detail": error["message"],
                    "error": Jsonb(error),
                },
            )
    except Exception:
        # The job's own failure is what matters; pgqueuer keeps its traceback either way.
        log.exception("could not record the failure of %s %s", stage.value, ref)
