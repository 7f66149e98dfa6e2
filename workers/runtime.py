"""The worker process: pgqueuer's QueueManager with the three stage entrypoints, and its
SchedulerManager with the periodic jobs (sweeps, heal, completion, prune).

Queue traffic (dequeue, heartbeats, job log) uses the driver's two autocommit connections;
stage work runs in transactions on a small pool.

Failure policy, per job:
- every start is counted in job_starts *before* the stage runs, in its own transaction, so
  an attempt cut short by a worker crash still counts (pgqueuer does not count those);
- a permanent error (PermanentJobError, bad data, a bug in SQL) fails the job at once;
- any other error is retried with exponential backoff (pgqueuer's RetryRequested);
- the start after the last allowed attempt fails the job without running it. A failed job is
  held (status 'failed') with its traceback: `failed_jobs` shows it, `replay_stage` reruns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from datetime import timedelta
from uuid import UUID

import psycopg
import psycopg_pool
from pgqueuer.db import PsycopgDriver
from pgqueuer.errors import RetryRequested
from pgqueuer.models import Job, Schedule
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries
from pgqueuer.sm import SchedulerManager
from pgqueuer.types import QueueExecutionMode
from psycopg_pool import AsyncConnectionPool

from workers import allocation, lifecycle, purchase, sessions
from workers.db import Conn, fetch_all, fetch_one, make_pool, transaction
from workers.driver import ListeningDriver
from workers.errors import PermanentJobError, StageNotFoundError, TooManyAttemptsError
from workers.settings import Settings
from workers.sql import q
from workers.stages import Handler, Stage, StageContext, record_failure, run_stage

log = logging.getLogger(__name__)

HANDLERS: dict[Stage, Handler] = {
    Stage.PURCHASE: purchase.handle,
    Stage.ALLOCATION: allocation.handle,
    Stage.SESSIONS: sessions.handle,
}

# Errors no retry can fix: wrong data or a query the schema does not accept.
PERMANENT: tuple[type[BaseException], ...] = (
    PermanentJobError,
    psycopg.errors.DataError,
    psycopg.errors.SyntaxErrorOrAccessRuleViolation,
)


def job_ref(job: Job) -> UUID:
    """The row id a job carries (enqueue_stage writes it as UTF-8 text)."""
    try:
        return UUID((job.payload or b"").decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StageNotFoundError(
            f"job {job.id} ({job.entrypoint}) carries {job.payload!r}, not a row id"
        ) from None


def backoff(starts: int) -> timedelta:
    """1 s, 2 s, 4 s ... capped at 5 minutes."""
    return min(timedelta(seconds=2 ** max(starts - 1, 0)), timedelta(minutes=5))


async def record_start(pool: AsyncConnectionPool[Conn], job: Job, stage: Stage, ref: UUID) -> int:
    async with transaction(pool) as conn:
        row = await fetch_one(
            conn,
            q("record_job_start"),
            {
                "job_id": int(job.id),
                "stage": stage.value,
                "ref_id": ref,
                "worker": job.queue_manager_id,
            },
        )
    assert row is not None
    return int(row["starts"])


async def run_job(
    pool: AsyncConnectionPool[Conn], settings: Settings, stage: Stage, handler: Handler, job: Job
) -> None:
    ctx = StageContext(settings=settings, job_id=int(job.id))
    ref = job_ref(job)
    try:
        starts = await record_start(pool, job, stage, ref)
    except PERMANENT:
        raise
    except Exception as exc:  # no connection now (the database restarting, a full pool)
        log.warning("%s %s: could not record the start (%s); retrying", stage.value, ref, exc)
        raise RetryRequested(delay=backoff(job.attempts + 1), reason=str(exc)[:500]) from exc
    if starts > settings.max_attempts:
        gave_up = TooManyAttemptsError(
            f"{stage.value} {ref}: started {starts - 1} times without success (the last "
            "attempts may have been cut short by worker crashes); held as failed, replay with "
            f"SELECT replay_stage('{stage.value}', '{ref}')"
        )
        await record_failure(pool, stage, ref, ctx, gave_up)
        raise gave_up
    try:
        await run_stage(pool, stage, handler, ref, ctx)
    except PERMANENT:
        raise
    except Exception as exc:
        if starts >= settings.max_attempts:
            raise
        raise RetryRequested(delay=backoff(starts), reason=str(exc)[:500]) from exc


def register_stages(qm: QueueManager, pool: AsyncConnectionPool[Conn], settings: Settings) -> None:
    for stage, handler in HANDLERS.items():

        def bind(stage: Stage = stage, handler: Handler = handler) -> None:
            @qm.entrypoint(stage.value, on_failure="hold")
            async def entry(job: Job) -> None:
                await run_job(pool, settings, stage, handler, job)

        bind()


def register_schedules(
    sm: SchedulerManager, pool: AsyncConnectionPool[Conn], settings: Settings
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
        async with transaction(pool) as conn:
            row = await fetch_one(
                conn, q("prune_history"), {"keep": timedelta(days=settings.retention_days)}
            )
        log.info(
            "pruned history older than %d days: %s",
            settings.retention_days,
            dict(row) if row else {},
        )


async def run_worker(
    url: str, settings: Settings, *, drain: bool = False, stop: asyncio.Event | None = None
) -> None:
    """Process jobs until `stop` is set (or, with drain, until the queue is empty).

    On stop: no new job is claimed, the jobs in flight finish, then it returns. Connection
    errors propagate to the caller (`serve` reconnects).
    """
    driver = await connect_driver(url, settings)
    pool = make_pool(url, settings.pool_size, settings.statement_timeout_seconds)
    try:
        await pool.open(wait=True, timeout=30)
        qm = QueueManager(Queries(driver))
        register_stages(qm, pool, settings)
        sm = SchedulerManager(Queries(driver))
        sm.shutdown = qm.shutdown
        register_schedules(sm, pool, settings)
        log.info(
            "worker %s started (stages: %s, batch %d, pool %d)",
            qm.queue_manager_id,
            ", ".join(HANDLERS),
            settings.batch_size,
            settings.pool_size,
        )
        relay = asyncio.create_task(_relay(stop, qm.shutdown)) if stop is not None else None
        try:
            queue = qm.run(
                batch_size=settings.batch_size,
                dequeue_timeout=timedelta(seconds=settings.idle_poll_seconds),
                heartbeat_timeout=timedelta(seconds=settings.heartbeat_seconds),
                # Claim no more than the pool can serve: unbounded, a backlog made a worker
                # claim batch after batch whose jobs then waited 30 s for a connection, failed
                # and were retried (10k backlog: 7,594 such failures, throughput fell 4x).
                max_concurrent_tasks=max(2 * settings.batch_size, settings.pool_size),
                mode=QueueExecutionMode.drain if drain else QueueExecutionMode.continuous,
            )
            if drain:  # a one-off run to empty the queue: no periodic jobs
                await queue
            else:
                await asyncio.gather(queue, sm.run())
        finally:
            if relay is not None:
                relay.cancel()
        log.info("worker %s stopped", qm.queue_manager_id)
    finally:
        await pool.close()
        await driver.close()


async def _relay(stop: asyncio.Event, shutdown: asyncio.Event) -> None:
    await stop.wait()
    shutdown.set()


async def connect_driver(url: str, settings: Settings) -> QueueDriver:
    if settings.queue_driver == "pgqueuer":
        # pgqueuer 1.6's own driver, kept to measure against: it polls NOTIFY with a 1 s
        # timeout under the query connection's lock.
        conn = await psycopg.AsyncConnection.connect(
            url, autocommit=True, application_name="koding-caravan-listen"
        )
        return PgqueuerDriver(conn)
    return await ListeningDriver.connect(url)


class PgqueuerDriver(PsycopgDriver):
    async def close(self) -> None:
        await self._connection.close()


QueueDriver = ListeningDriver | PgqueuerDriver

# Errors after which a worker reconnects instead of exiting: the database went away.
RECONNECT: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.errors.AdminShutdown,
    psycopg.errors.CannotConnectNow,
    psycopg_pool.PoolTimeout,
    ConnectionError,
    OSError,
)


async def serve(url: str, settings: Settings) -> None:
    """A worker for the long run: SIGINT/SIGTERM stop it (jobs in flight finish, within
    KC_SHUTDOWN_SECONDS); a lost database connection or a restart makes it reconnect with
    exponential backoff instead of exiting."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    delay = 0.5
    try:
        while not stop.is_set():
            started = loop.time()
            work = asyncio.create_task(run_worker(url, settings, stop=stop))
            try:
                await _bounded(work, stop, settings.shutdown_seconds)
                return
            except RECONNECT as exc:
                if stop.is_set():
                    return
                if loop.time() - started > 60:
                    delay = 0.5
                log.warning(
                    "database connection lost (%s); reconnecting in %.1fs",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 30.0)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _bounded(work: asyncio.Task[None], stop: asyncio.Event, bound: float) -> None:
    """Await `work`; once `stop` is set, give it `bound` seconds to finish, then cancel it
    (its jobs stay picked and are taken again after the heartbeat timeout)."""
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        try:
            await asyncio.wait_for(asyncio.shield(work), bound)
        except TimeoutError:
            # Cancelling would make pgqueuer log the jobs as canceled and delete them. Leave
            # instead, as a crash would: the jobs stay picked, their transactions roll back,
            # and another worker takes them once the heartbeat is stale.
            log.warning(
                "jobs still running %.0fs after the stop request; leaving them to be picked again",
                bound,
            )
            logging.shutdown()
            os._exit(0)
        return None
    finally:
        stopping.cancel()
