"""The failure policy, per job:
- every start is counted in job_starts *before* the stage runs, in its own transaction, so
  an attempt cut short by a worker crash still counts (pgqueuer does not count those);
- a permanent error (PermanentJobError, bad data, a bug in SQL) fails the job at once;
- any other error is retried with exponential backoff (pgqueuer's RetryRequested);
- the start after the last allowed attempt fails the job without running it. A failed job is
  held (status 'failed') with its traceback: `failed_jobs` shows it, `replay_stage` reruns it.
- each failed attempt is logged once, with its traceback, the stage, the row and the job
  (`log_failure`); pgqueuer's own copy of that traceback is dropped (`OneTracebackPerFailure`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from uuid import UUID

import psycopg
from pgqueuer.errors import RetryRequested
from pgqueuer.models import Job
from psycopg_pool import AsyncConnectionPool

from workers.database.connections import AsyncConn, fetch_all, transaction
from workers.database.sql import q
from workers.errors import PermanentJobError
from workers.settings import Settings
from workers.stages.contract import Stage

log = logging.getLogger(__name__)

# Errors no retry can fix: wrong data or a query the schema does not accept.
PERMANENT: tuple[type[BaseException], ...] = (
    PermanentJobError,
    psycopg.errors.DataError,
    psycopg.errors.SyntaxErrorOrAccessRuleViolation,
)


def backoff(starts: int) -> timedelta:
    """1 s, 2 s, 4 s ... capped at 5 minutes."""
    return min(timedelta(seconds=2 ** max(starts - 1, 0)), timedelta(minutes=5))


async def record_starts(
    pool: AsyncConnectionPool[AsyncConn], stage: Stage, jobs: list[tuple[Job, UUID]]
) -> dict[int, int]:
    """Count a start for every job of a batch (one statement, its own transaction)."""
    async with transaction(pool) as conn:
        rows = await fetch_all(
            conn,
            q("record_job_starts"),
            {
                "stage": stage.value,
                "job_ids": [int(job.id) for job, _ in jobs],
                "refs": [ref for _, ref in jobs],
                "worker": jobs[0][0].queue_manager_id,
            },
        )
    return {int(row["job_id"]): int(row["starts"]) for row in rows}


def failure_policy(
    job: Job, stage: Stage, ref: UUID, exc: Exception, starts: int, settings: Settings
) -> BaseException:
    """What pgqueuer sees for a job whose work failed: the error itself (held as failed) when
    no retry can help or this was the last attempt, else a retry with backoff."""
    if isinstance(exc, PERMANENT) or starts >= settings.max_attempts:
        log_failure(job, stage, ref, exc, starts=starts, retry_in=None)
        return exc
    log_failure(job, stage, ref, exc, starts=starts, retry_in=backoff(starts))
    retry = RetryRequested(delay=backoff(starts), reason=str(exc)[:500])
    retry.__cause__ = exc
    return retry


# Set on an exception log_failure has logged, so that pgqueuer's record of it is dropped.
_LOGGED = "kc_logged"


def log_failure(
    job: Job,
    stage: Stage,
    ref: UUID,
    exc: BaseException,
    *,
    starts: int,
    retry_in: timedelta | None,
) -> None:
    """The one log record of a failed attempt: stage, row, job, start, what happens next, and
    the traceback."""
    extra = {"stage": stage.value, "ref": str(ref), "job_id": int(job.id)}
    if retry_in is not None:
        log.warning(
            "%s %s: job %s failed on start %d, retried in %s: %s",
            stage.value,
            ref,
            job.id,
            starts,
            retry_in,
            exc,
            exc_info=exc,
            extra=extra,
        )
    else:
        log.error(
            "%s %s: job %s failed on start %d and is held as failed (make failures; "
            "make replay STAGE=%s ID=%s): %s",
            stage.value,
            ref,
            job.id,
            starts,
            stage.value,
            ref,
            exc,
            exc_info=exc,
            extra=extra,
        )
    setattr(exc, _LOGGED, True)


class OneTracebackPerFailure(logging.Filter):
    """pgqueuer logs the traceback of every job that raises ("Exception while processing
    entrypoint/job-id"). For an exception log_failure has logged already, with the row and
    the attempt, that second copy is dropped; anything else pgqueuer logs stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and getattr(exc, _LOGGED, False))
