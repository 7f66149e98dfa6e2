"""What every stage shares: the stage names, outcomes, the holidays, and the wrapper that
runs a batch of rows of one stage in one transaction.

A stage handler takes the rows of a batch and returns, for each, an Outcome or the exception
that row raised; the wrapper writes every history line in that same transaction (one
statement), so "done" is recorded exactly when the work commits. A row that raises leaves
nothing behind (its work ran in a savepoint, see `one_by_one`) and gets a `failed` line; its
neighbours commit. When the transaction itself fails (the connection is lost, the commit is
refused), every row of the batch fails and the failures are recorded on their own.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum
from typing import Any, Literal
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
    """What a batch's work may read besides its rows: the settings, and the holidays, read
    once per batch (run_batch gives every batch a fresh context)."""

    settings: Settings
    _holidays: list[tuple[date, frozenset[date]]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    async def holidays(self, conn: AsyncConn, from_day: date) -> set[date]:
        """load_holidays, from the database once per batch (and again only for an earlier
        day than any asked before)."""
        if self._holidays and self._holidays[0][0] <= from_day:
            return {day for day in self._holidays[0][1] if day >= from_day}
        days = await load_holidays(conn, from_day)
        self._holidays[:] = [(from_day, frozenset(days))]
        return days


@dataclass(frozen=True)
class Work:
    """One row for a stage, and the queue job that asked for it (None: run by hand)."""

    ref: UUID
    job_id: int | None = None


# What a batch gives back: per row, its outcome or what it raised.
Results = dict[UUID, Outcome | Exception]
# A stage: the rows of one batch (distinct ids) in, a result for each out. It runs inside
# the batch's transaction and must not let one row's failure undo another's work.
Handler = Callable[[AsyncConn, list[UUID], StageContext], Awaitable[Results]]
# One row at a time (inside a savepoint the caller opens).
OneHandler = Callable[[AsyncConn, UUID, StageContext], Awaitable[Outcome]]


async def load_holidays(conn: AsyncConn, from_day: date) -> set[date]:
    """The days without sessions (`holidays`), from `from_day` on: every stage that plans
    a schedule reads them here, in its own transaction."""
    rows = await fetch_all(conn, q("holidays_from"), {"from_day": from_day})
    return {row["day"] for row in rows}


async def one_by_one(
    conn: AsyncConn, refs: Sequence[UUID], ctx: StageContext, handle: OneHandler
) -> Results:
    """Each row in its own savepoint: a row that raises is rolled back alone (its locks
    too) and the next one goes on."""
    results: Results = {}
    for ref in refs:
        try:
            async with conn.transaction():
                results[ref] = await handle(conn, ref, ctx)
        except Exception as exc:
            results[ref] = exc
    return results


async def together_or_one_by_one(
    conn: AsyncConn,
    refs: Sequence[UUID],
    ctx: StageContext,
    *,
    together: Handler,
    one: OneHandler,
) -> Results:
    """The set-based path for the whole batch, in a savepoint; when any row makes it raise
    (bad data, a constraint, a lock timeout), it is rolled back and every row runs alone,
    so the one at fault fails by itself."""
    if len(refs) > 1:
        try:
            async with conn.transaction():
                results = await together(conn, list(refs), ctx)
                failed = [r for r in results.values() if isinstance(r, Exception)]
                if failed:
                    raise failed[0]  # rolls the whole batch's work back
            return results
        except Exception as exc:
            log.debug("batch of %d fell back to one row at a time: %s", len(refs), exc)
    return await one_by_one(conn, refs, ctx, one)


def one_of(together: Handler) -> OneHandler:
    """A set-based handler run for one row: its outcome, or what it raised."""

    async def one(conn: AsyncConn, ref: UUID, ctx: StageContext) -> Outcome:
        result = (await together(conn, [ref], ctx))[ref]
        if isinstance(result, Exception):
            raise result
        return result

    return one


def error_record(exc: BaseException) -> dict[str, str]:
    return {
        "type": type(exc).__name__,
        "message": str(exc)[:2000],
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
    }


async def _write_history(
    conn: AsyncConn, stage: Stage, lines: Sequence[tuple[Work, Outcome | BaseException]]
) -> None:
    """Every line of a batch in one statement."""
    events: list[str] = []
    details: list[str] = []
    errors: list[Jsonb | None] = []
    for _, result in lines:
        if isinstance(result, Outcome):
            events.append(result.event)
            details.append(result.detail)
            errors.append(None)
        else:
            error = error_record(result)
            events.append("failed")
            details.append(error["message"])
            errors.append(Jsonb(error))
    await conn.execute(
        q("record_history_many"),
        {
            "stage": stage.value,
            "refs": [work.ref for work, _ in lines],
            "events": events,
            "job_ids": [work.job_id for work, _ in lines],
            "details": details,
            "errors": errors,
        },
    )


async def run_batch(
    pool: AsyncConnectionPool[AsyncConn],
    stage: Stage,
    handler: Handler,
    works: Sequence[Work],
    ctx: StageContext,
) -> dict[UUID, Outcome | Exception]:
    """Run the rows (distinct ids) in one transaction; per row, its outcome or exception."""
    refs = [work.ref for work in works]
    ctx = replace(ctx)  # a fresh holidays memo: a batch never reads another batch's
    if len(set(refs)) != len(refs):
        raise ValueError(f"a {stage.value} batch names a row twice: {refs}")
    try:
        async with transaction(pool) as conn:
            results = await handler(conn, refs, ctx)
            missing = [ref for ref in refs if ref not in results]
            if missing:
                raise RuntimeError(f"the {stage.value} stage gave no result for {missing}")
            await _write_history(conn, stage, [(work, results[work.ref]) for work in works])
    except Exception as exc:
        # Logged once, with its traceback, by the caller that decides what happens next
        # (worker.run_jobs: retried or held).
        await record_failures(pool, stage, [(work, exc) for work in works])
        return {ref: exc for ref in refs}
    for work in works:
        result = results[work.ref]
        if isinstance(result, Outcome):
            extra: dict[str, Any] = {
                "stage": stage.value,
                "ref": str(work.ref),
                "job_id": work.job_id,
            }
            log.info(
                "%s %s %s: %s", stage.value, work.ref, result.event, result.detail, extra=extra
            )
    return results


async def run_stage(
    pool: AsyncConnectionPool[AsyncConn],
    stage: Stage,
    handler: Handler,
    ref: UUID,
    ctx: StageContext,
    job_id: int | None = None,
) -> Outcome:
    """One row (a replay by hand, a test): its outcome, or what it raised."""
    result = (await run_batch(pool, stage, handler, [Work(ref, job_id)], ctx))[ref]
    if isinstance(result, Exception):
        raise result
    return result


async def record_failures(
    pool: AsyncConnectionPool[AsyncConn],
    stage: Stage,
    failures: Sequence[tuple[Work, BaseException]],
) -> None:
    """`failed` history lines for rows whose work could not commit, in a transaction of
    their own."""
    if not failures:
        return
    try:
        async with transaction(pool) as conn:
            await _write_history(conn, stage, failures)
    except Exception:
        # The jobs' own failures are what matter; pgqueuer keeps their tracebacks either way.
        log.exception(
            "could not record the failure of %s %s",
            stage.value,
            ", ".join(str(work.ref) for work, _ in failures),
        )
