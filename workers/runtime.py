"""The worker process: pgqueuer's QueueManager with the three stage entrypoints.

Queue traffic (dequeue, heartbeats, job log) uses one autocommit connection owned by
pgqueuer's driver; stage work runs in transactions on a small pool.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta
from uuid import UUID

from pgqueuer.executors import DatabaseRetryEntrypointExecutor, EntrypointExecutorParameters
from pgqueuer.models import Job, Schedule
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries
from pgqueuer.sm import SchedulerManager
from pgqueuer.types import QueueExecutionMode
from psycopg_pool import AsyncConnectionPool

from workers import allocation, purchase, sessions
from workers.db import Conn, fetch_all, fetch_one, make_pool, transaction
from workers.driver import ListeningDriver
from workers.errors import StageNotFoundError
from workers.settings import Settings
from workers.sql import q
from workers.stages import Handler, Stage, StageContext, run_stage

log = logging.getLogger(__name__)

HANDLERS: dict[Stage, Handler] = {
    Stage.PURCHASE: purchase.handle,
    Stage.ALLOCATION: allocation.handle,
    Stage.SESSIONS: sessions.handle,
}


def job_ref(job: Job) -> UUID:
    """The row id a job carries (enqueue_stage writes it as UTF-8 text)."""
    try:
        return UUID((job.payload or b"").decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StageNotFoundError(
            f"job {job.id} ({job.entrypoint}) carries {job.payload!r}, not a row id"
        ) from None


def register_stages(qm: QueueManager, pool: AsyncConnectionPool[Conn], settings: Settings) -> None:
    def retrying(parameters: EntrypointExecutorParameters) -> DatabaseRetryEntrypointExecutor:
        return DatabaseRetryEntrypointExecutor(
            parameters=parameters,
            max_attempts=settings.max_attempts,
            initial_delay=timedelta(seconds=1),
            max_delay=timedelta(minutes=5),
        )

    for stage, handler in HANDLERS.items():

        def bind(stage: Stage = stage, handler: Handler = handler) -> None:
            @qm.entrypoint(stage.value, on_failure="hold", executor_factory=retrying)
            async def entry(job: Job) -> None:
                ctx = StageContext(settings=settings, job_id=int(job.id))
                await run_stage(pool, stage, handler, job_ref(job), ctx)

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


async def run_worker(url: str, settings: Settings, *, drain: bool = False) -> None:
    """Process jobs until SIGINT/SIGTERM (or, with drain, until the queue is empty)."""
    driver = await ListeningDriver.connect(url)
    pool = make_pool(url, settings.pool_size)
    await pool.open(wait=True)
    qm = QueueManager(Queries(driver))
    register_stages(qm, pool, settings)
    sm = SchedulerManager(Queries(driver))
    sm.shutdown = qm.shutdown
    register_schedules(sm, pool, settings)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, qm.shutdown.set)
    log.info(
        "worker %s started (stages: %s, batch %d, pool %d)",
        qm.queue_manager_id,
        ", ".join(HANDLERS),
        settings.batch_size,
        settings.pool_size,
    )
    try:
        queue = qm.run(
            batch_size=settings.batch_size,
            dequeue_timeout=timedelta(seconds=settings.idle_poll_seconds),
            mode=QueueExecutionMode.drain if drain else QueueExecutionMode.continuous,
        )
        if drain:  # a one-off run to empty the queue: no periodic jobs
            await queue
        else:
            await asyncio.gather(queue, sm.run())
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await pool.close()
        await driver.close()
        log.info("worker %s stopped", qm.queue_manager_id)
