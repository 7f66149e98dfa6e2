"""The contract between the runtime and the stages: the stage names, what a stage returns,
what it may read besides its rows, how it wants its transactions, and the helpers that run
a batch's rows together or one by one.

A stage module defines `handle(conn, refs, ctx) -> Results` and a `SPEC` naming its stage and
its transactions; the runtime (`workers/runtime/`) imports the stages, never the reverse.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Literal
from uuid import UUID

from workers.database.connections import AsyncConn, fetch_all
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


@dataclass(frozen=True)
class StageSpec:
    """A stage as the runtime registers it: its name, its batch handler, and how it wants its
    transactions. `one_transaction_per_row`: the batch's rows each commit on their own, one
    after the other, each job done (and its place among the worker's claimed jobs free) as
    soon as its row commits; otherwise the whole batch is one transaction."""

    stage: Stage
    handle: Handler
    one_transaction_per_row: bool = False
