"""The worker process: pgqueuer's QueueManager with the stages' entrypoints and its
SchedulerManager with the periodic jobs (`registration.py`), connected, stopped on a signal,
and reconnected when the database goes away (`serve`).

Queue traffic (dequeue, heartbeats, job log) uses the driver's two autocommit connections;
stage work runs in transactions on a small pool. What happens to a failing job:
`failures.py`; how a lost connection is told: `connection_loss.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

import psycopg
from pgqueuer.db import PsycopgDriver
from pgqueuer.ports.driver import NotifyCallback
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries
from pgqueuer.sm import SchedulerManager
from pgqueuer.types import QueueExecutionMode

from workers.database.connections import WORKER_ROLE, make_pool, role_options
from workers.runtime.connection_loss import RECONNECT, ConnectionLossFilter, first_line
from workers.runtime.driver import ListeningDriver, screened
from workers.runtime.failures import OneTracebackPerFailure
from workers.runtime.registration import STAGES, register_schedules, register_stages
from workers.settings import Settings

log = logging.getLogger(__name__)


def idle_poll(settings: Settings) -> timedelta:
    """How long an idle worker waits for a notification before it looks at the queue. It
    also looks for jobs whose worker died (heartbeat older than KC_HEARTBEAT_SECONDS), so it
    looks often enough for such a job to be picked again within recovery_bound()."""
    return timedelta(seconds=min(settings.idle_poll_seconds, settings.heartbeat_seconds / 4))


def recovery_bound(settings: Settings) -> timedelta:
    """Longest time from a worker's crash until another (idle) worker picks its jobs again:
    the heartbeat turns stale, then one idle poll (plus the queries' own time)."""
    return timedelta(seconds=settings.heartbeat_seconds) + idle_poll(settings)


async def run_worker(
    url: str,
    settings: Settings,
    *,
    drain: bool = False,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Process jobs until `stop` is set (or, with drain, until the queue is empty).

    On stop: no new job is claimed, the jobs in flight finish, then it returns. Connection
    errors propagate to the caller (`serve` reconnects). `on_ready` is called once connected.
    """
    driver = await connect_driver(url, settings)
    pool = make_pool(url, settings.pool_size, settings.statement_timeout_seconds)
    one_traceback = OneTracebackPerFailure()
    logging.getLogger("pgqueuer").addFilter(one_traceback)
    try:
        await pool.open(wait=True, timeout=30)
        if on_ready is not None:
            on_ready()
        qm = QueueManager(Queries(driver))
        register_stages(qm, pool, settings)
        sm = SchedulerManager(Queries(driver))
        sm.shutdown = qm.shutdown
        register_schedules(sm, pool, settings)
        log.info(
            "worker %s started (stages: %s, batch %d, pool %d)",
            qm.queue_manager_id,
            ", ".join(STAGES),
            settings.batch_size,
            settings.pool_size,
        )
        relay = asyncio.create_task(_relay(stop, qm.shutdown)) if stop is not None else None
        try:
            queue = qm.run(
                batch_size=settings.batch_size,
                dequeue_timeout=idle_poll(settings),
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
                await _together(queue, sm.run())
        finally:
            if relay is not None:
                relay.cancel()
        log.info("worker %s stopped", qm.queue_manager_id)
    finally:
        logging.getLogger("pgqueuer").removeFilter(one_traceback)
        await pool.close()
        await driver.close()


async def _together(*work: Coroutine[object, object, None]) -> None:
    """Run until every one finishes. The first failure stops the others and is raised; their
    own failures are collected here, not left for asyncio to print at exit (a lost connection
    fails the queue and the scheduler alike)."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome


async def _relay(stop: asyncio.Event, shutdown: asyncio.Event) -> None:
    await stop.wait()
    shutdown.set()


async def connect_driver(url: str, settings: Settings) -> QueueDriver:
    if settings.queue_driver == "pgqueuer":
        # pgqueuer 1.6's own driver, kept to measure against: it polls NOTIFY with a 1 s
        # timeout under the query connection's lock.
        conn = await psycopg.AsyncConnection.connect(
            url,
            autocommit=True,
            application_name="koding-caravan-listen",
            options=role_options(url, WORKER_ROLE),
        )
        return PgqueuerDriver(conn)
    return await ListeningDriver.connect(url)


class PgqueuerDriver(PsycopgDriver):
    """pgqueuer's driver, with what it hears screened as ListeningDriver screens it."""

    def __init__(self, connection: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        super().__init__(connection)
        self._screens: dict[tuple[str, NotifyCallback], NotifyCallback] = {}

    async def add_listener(self, channel: str, callback: NotifyCallback) -> None:
        def screen(payload: str | bytes | bytearray) -> None:
            text = payload if isinstance(payload, str) else bytes(payload).decode(errors="replace")
            if screened(channel, text):
                callback(payload)

        self._screens[(channel, callback)] = screen
        await super().add_listener(channel, screen)

    async def remove_listener(self, channel: str, callback: NotifyCallback) -> None:
        await super().remove_listener(channel, self._screens.pop((channel, callback), callback))

    async def close(self) -> None:
        await self._connection.close()


QueueDriver = ListeningDriver | PgqueuerDriver


async def serve(url: str, settings: Settings) -> None:
    """A worker for the long run: SIGINT/SIGTERM stop it (jobs in flight finish, within
    KC_SHUTDOWN_SECONDS); a lost database connection or a restart makes it reconnect with
    exponential backoff instead of exiting."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    quiet = ConnectionLossFilter()
    # A filter applies to the records of its own logger only, so each one that logs per job.
    noisy = [
        logging.getLogger(name)
        for name in (
            "pgqueuer",
            "psycopg.pool",
            __name__,
            "workers.runtime.registration",
            "workers.runtime.failures",
            "workers.runtime.runner",
        )
    ]
    for logger in noisy:
        logger.addFilter(quiet)
    delay = 0.5
    lost_at: float | None = None
    attempts = 0

    def connected() -> None:
        nonlocal lost_at, attempts
        if lost_at is not None:
            log.warning(
                "database connection back after %.1fs (%d attempt(s)); %d message(s) about "
                "jobs cut short not shown: they are retried or picked again",
                loop.time() - lost_at,
                attempts,
                quiet.suppressed,
            )
        lost_at, attempts = None, 0
        quiet.lost, quiet.suppressed = False, 0

    try:
        while not stop.is_set():
            started = loop.time()
            work = asyncio.create_task(run_worker(url, settings, stop=stop, on_ready=connected))
            try:
                await _bounded(work, stop, settings.shutdown_seconds)
                return
            except RECONNECT as exc:
                if stop.is_set():
                    return
                if loop.time() - started > 60:
                    delay = 0.5
                attempts += 1
                if lost_at is None:
                    lost_at = loop.time()
                    quiet.lost = True
                    log.warning(
                        "database connection lost (%s); reconnecting with backoff (%.1fs, "
                        "doubling to 30s)",
                        first_line(exc),
                        delay,
                    )
                else:
                    log.debug("still no database (%s); next try in %.1fs", first_line(exc), delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 30.0)
    finally:
        for logger in noisy:
            logger.removeFilter(quiet)
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
