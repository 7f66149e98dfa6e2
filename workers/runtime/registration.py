"""What a worker runs: one pgqueuer entrypoint per stage (the stages' SPECs), each job
through a Batcher into `run_jobs` under the failure policy, and the periodic jobs (sweeps,
heal, completion, prune)."""

from __future__ import annotations

import logging
from datetime import timedelta
from uuid import UUID

from pgqueuer.errors import RetryRequested
from pgqueuer.models import Job, Schedule
from pgqueuer.qm import QueueManager
from pgqueuer.sm import SchedulerManager
from psycopg_pool import AsyncConnectionPool

from workers.database.connections import AsyncConn, fetch_all, fetch_one, transaction
from workers.database.sql import q
from workers.errors import StageNotFoundError, TooManyAttemptsError
from workers.runtime.batching import Batcher, Report
from workers.runtime.connection_loss import connection_lost
from workers.runtime.failures import (
    PERMANENT,
    backoff,
    failure_policy,
    log_failure,
    record_starts,
)
from workers.runtime.runner import Work, record_failures, run_batch
from workers.settings import Settings
from workers.stages import allocation, lifecycle, purchase, sessions
from workers.stages.contract import Outcome, Stage, StageContext, StageSpec

log = logging.getLogger(__name__)

# The stages a worker runs, each as its module declares it (name, handler, transactions).
STAGES: dict[Stage, StageSpec] = {
    spec.stage: spec for spec in (purchase.SPEC, allocation.SPEC, sessions.SPEC)
}


def job_ref(job: Job) -> UUID:
    """The row id a job carries (enqueue_stage writes it as UTF-8 text)."""
    try:
        return UUID((job.payload or b"").decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StageNotFoundError(
            f"job {job.id} ({job.entrypoint}) carries {job.payload!r}, not a row id"
        ) from None


async def run_jobs(
    pool: AsyncConnectionPool[AsyncConn],
    settings: Settings,
    spec: StageSpec,
    jobs: list[Job],
    report: Report | None = None,
) -> list[BaseException | None]:
    """Run a batch of one stage's jobs (distinct rows); per job None (done) or the exception
    pgqueuer is to see: RetryRequested (retried with backoff) or another (held as failed).
    `report` hears of each job (its place in `jobs`, that outcome) as soon as it is done:
    for a stage that commits each row on its own, before the rest of the batch has run."""
    if not jobs:
        return []
    stage, handler = spec.stage, spec.handle
    ctx = StageContext(settings=settings)
    refs = [job_ref(job) for job in jobs]
    try:
        starts = await record_starts(pool, stage, list(zip(jobs, refs, strict=True)))
    except PERMANENT:
        raise
    except Exception as exc:  # no connection now (the database restarting, a full pool)
        # A lost connection is logged once by the worker (serve), not once per job.
        log.log(
            logging.DEBUG if connection_lost(exc) else logging.WARNING,
            "%s: could not record the start of %d job(s) (%s); retrying",
            stage.value,
            len(jobs),
            exc,
        )
        return [
            RetryRequested(delay=backoff(job.attempts + 1), reason=str(exc)[:500]) for job in jobs
        ]
    outcome: dict[int, BaseException | None] = {}
    runnable: list[Work] = []
    gave_up: list[tuple[Work, BaseException]] = []
    for job, ref in zip(jobs, refs, strict=True):
        work, started = Work(ref, int(job.id)), starts[int(job.id)]
        if started > settings.max_attempts:
            error = TooManyAttemptsError(
                f"{stage.value} {ref}: started {started - 1} times without success "
                "(the last attempts may have been cut short by worker crashes); held as "
                f"failed, replay with SELECT replay_stage('{stage.value}', '{ref}')"
            )
            gave_up.append((work, error))
            log_failure(job, stage, ref, error, starts=started, retry_in=None)
            outcome[int(job.id)] = error
        else:
            runnable.append(work)
    await record_failures(pool, stage, gave_up)
    place = {int(job.id): index for index, job in enumerate(jobs)}

    def finish(work: Work, result: Outcome | Exception) -> None:
        job = jobs[place[int(work.job_id or 0)]]
        outcome[int(job.id)] = (
            None
            if isinstance(result, Outcome)
            else failure_policy(job, stage, work.ref, result, starts[int(job.id)], settings)
        )
        if report is not None:
            report(place[int(job.id)], outcome[int(job.id)])

    if spec.one_transaction_per_row:
        for work in runnable:  # each job is done, and says so, when its row commits
            finish(work, (await run_batch(pool, stage, handler, [work], ctx))[work.ref])
    elif runnable:
        results = await run_batch(pool, stage, handler, runnable, ctx)
        for work in runnable:
            finish(work, results[work.ref])
    return [outcome[int(job.id)] for job in jobs]


def register_stages(
    qm: QueueManager, pool: AsyncConnectionPool[AsyncConn], settings: Settings
) -> None:
    """One entrypoint per stage. Its jobs go through a Batcher: the jobs of one stage that
    the worker claimed together run together, in one transaction (`run_jobs`); one after the
    other, each done when it commits, for a stage whose SPEC says one_transaction_per_row."""
    for spec in STAGES.values():

        def bind(spec: StageSpec = spec) -> None:
            async def run(jobs: list[Job], report: Report) -> list[BaseException | None]:
                return await run_jobs(pool, settings, spec, jobs, report)

            batcher: Batcher[Job] = Batcher(
                run,
                key=lambda job: job.payload,
                max_size=settings.stage_batch_size,
                max_running=settings.stage_batches,
            )

            @qm.entrypoint(spec.stage.value, on_failure="hold")
            async def entry(job: Job) -> None:
                job_ref(job)  # a payload that names no row fails alone, before any batch
                await batcher.submit(job)

        bind()


def register_schedules(
    sm: SchedulerManager, pool: AsyncConnectionPool[AsyncConn], settings: Settings
) -> None:
    """Periodic jobs (pgqueuer cron: every worker registers them, one runs each tick)."""

    @sm.schedule("sweep_pending_allocations", "* * * * *")
    async def sweep(schedule: Schedule) -> None:
        async with transaction(pool) as conn:
            row = await fetch_one(
                conn,
                q("sweep_pending"),
                {"min_age": timedelta(seconds=settings.pending_retry_seconds)},
            )
        if row and row["enqueued"]:
            log.info("sweep: %d pending allocation(s) enqueued for another try", row["enqueued"])

    @sm.schedule("heal_pipeline", "* * * * *")
    async def heal(schedule: Schedule) -> None:
        async with transaction(pool) as conn:
            healed = await fetch_all(
                conn,
                q("heal_pipeline"),
                {"min_age": timedelta(seconds=settings.heal_after_seconds)},
            )
        for row in healed:
            log.warning(
                "healed: %s %s had no next stage and no live job; enqueued it again",
                row["stage"],
                row["ref_id"],
            )

    @sm.schedule("complete_finished", "* * * * *")
    async def complete(schedule: Schedule) -> None:
        counts = await lifecycle.complete(pool, settings)
        if any(counts.values()):
            log.info("completed: %s", counts)

    @sm.schedule("sweep_lifecycle", "*/10 * * * *")
    async def sweep_lifecycle(schedule: Schedule) -> None:
        if enqueued := await lifecycle.sweep(pool, settings):
            log.warning(
                "lifecycle sweep: %d purchase(s) whose trainer left or whose reschedule was "
                "not carried out enqueued again",
                enqueued,
            )

    @sm.schedule("prune_history", "17 3 * * *")
    async def prune(schedule: Schedule) -> None:
        keep = {"keep": timedelta(days=settings.retention_days)}
        async with transaction(pool) as conn:
            row = await fetch_one(conn, q("prune_history"), keep)
            # Business events as old, once every consumer has passed them (docs/events.md).
            events = await fetch_one(conn, q("prune_events"), keep)
        log.info(
            "pruned history older than %d days: %s",
            settings.retention_days,
            (dict(row) if row else {}) | (dict(events) if events else {}),
        )
