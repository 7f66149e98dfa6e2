"""The wrapper that runs a batch of rows of one stage in one transaction and records what
became of each (the stages' own contract is `workers/stages/contract.py`).

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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from workers.database.connections import AsyncConn, transaction
from workers.database.sql import q
from workers.stages.contract import Handler, Outcome, Stage, StageContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Work:
    """One row for a stage, and the queue job that asked for it (None: run by hand)."""

    ref: UUID
    job_id: int | None = None


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
