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
- each failed attempt is logged once, with its traceback, the stage, the row and the job
  (`log_failure`); pgqueuer's own copy of that traceback is dropped (`OneTracebackPerFailure`).
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
from uuid import UUID

import psycopg
import psycopg_pool
from pgqueuer.db import PsycopgDriver
from pgqueuer.errors import RetryRequested
from pgqueuer.models import Job, Schedule
from pgqueuer.ports.driver import NotifyCallback
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries
from pgqueuer.sm import SchedulerManager
from pgqueuer.types import QueueExecutionMode
from psycopg_pool import AsyncConnectionPool

from workers.database.connections import (
    WORKER_ROLE,
    AsyncConn,
    fetch_all,
    fetch_one,
    make_pool,
    role_options,
    transaction,
)
from workers.database.sql import q
from workers.errors import PermanentJobError, StageNotFoundError, TooManyAttemptsError
from workers.runtime.batching import Batcher, Report
from workers.runtime.driver import ListeningDriver, screened
from workers.runtime.runner import (
    Handler,
    Outcome,
    Stage,
    StageContext,
    Work,
    record_failures,
    run_batch,
)
from workers.settings import Settings
from workers.stages import allocation, lifecycle, purchase, sessions

log = logging.getLogger(__name__)

HANDLERS: dict[Stage, Handler] = {
    Stage.PURCHASE: purchase.handle,
    Stage.ALLOCATION: allocation.handle,
    Stage.SESSIONS: sessions.handle,
}

# Stages whose rows each commit on their own (one after the other, in the batch's task), each
# job done, and its place among the worker's claimed jobs free, as soon as its row commits.
# The allocation stage holds a trainer's lock from the re-check to the commit: in a
# transaction for the whole batch, every trainer a batch booked stayed locked until the batch
# ended, so other batches passed over the best trainer or waited for it. And a batch of 20
# rows whose jobs were all done only when the last was kept the worker's places taken, while
# the sessions of approved purchases waited for one (issue 22).
ONE_TRANSACTION_PER_ROW = frozenset({Stage.ALLOCATION})

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


async def run_jobs(
    pool: AsyncConnectionPool[AsyncConn],
    settings: Settings,
    stage: Stage,
    handler: Handler,
    jobs: list[Job],
    report: Report | None = None,
) -> list[BaseException | None]:
    """Run a batch of one stage's jobs (distinct rows); per job None (done) or the exception
    pgqueuer is to see: RetryRequested (retried with backoff) or another (held as failed).
    `report` hears of each job (its place in `jobs`, that outcome) as soon as it is done:
    for a stage in ONE_TRANSACTION_PER_ROW, before the rest of the batch has run."""
    if not jobs:
        return []
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

    if stage in ONE_TRANSACTION_PER_ROW:
        for work in runnable:  # each job is done, and says so, when its row commits
            finish(work, (await run_batch(pool, stage, handler, [work], ctx))[work.ref])
    elif runnable:
        results = await run_batch(pool, stage, handler, runnable, ctx)
        for work in runnable:
            finish(work, results[work.ref])
    return [outcome[int(job.id)] for job in jobs]


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


def idle_poll(settings: Settings) -> timedelta:
    """How long an idle worker waits for a notification before it looks at the queue. It
    also looks for jobs whose worker died (heartbeat older than KC_HEARTBEAT_SECONDS), so it
    looks often enough for such a job to be picked again within recovery_bound()."""
    return timedelta(seconds=min(settings.idle_poll_seconds, settings.heartbeat_seconds / 4))


def recovery_bound(settings: Settings) -> timedelta:
    """Longest time from a worker's crash until another (idle) worker picks its jobs again:
    the heartbeat turns stale, then one idle poll (plus the queries' own time)."""
    return timedelta(seconds=settings.heartbeat_seconds) + idle_poll(settings)


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


def register_stages(
    qm: QueueManager, pool: AsyncConnectionPool[AsyncConn], settings: Settings
) -> None:
    """One entrypoint per stage. Its jobs go through a Batcher: the jobs of one stage that
    the worker claimed together run together, in one transaction (`run_jobs`); one after the
    other, each done when it commits, for the stages in ONE_TRANSACTION_PER_ROW."""
    for stage, handler in HANDLERS.items():

        def bind(stage: Stage = stage, handler: Handler = handler) -> None:
            async def run(jobs: list[Job], report: Report) -> list[BaseException | None]:
                return await run_jobs(pool, settings, stage, handler, jobs, report)

            batcher: Batcher[Job] = Batcher(
                run,
                key=lambda job: job.payload,
                max_size=settings.stage_batch_size,
                max_running=settings.stage_batches,
            )

            @qm.entrypoint(stage.value, on_failure="hold")
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
            ", ".join(HANDLERS),
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

# Errors after which a worker reconnects instead of exiting: the database went away.
RECONNECT: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.errors.AdminShutdown,
    psycopg.errors.CannotConnectNow,
    psycopg_pool.PoolTimeout,
    ConnectionError,
    OSError,
)


# SQLSTATE classes that mean the server went away: 08 connection exception, 57P operator
# intervention (admin/crash shutdown, cannot connect now). psycopg raises OperationalError
# without a SQLSTATE when the socket itself broke.
_LOST_SQLSTATES = ("08", "57P")
# What psycopg's pool says (without an exception attached) when the server is going or gone.
_POOL_LOSS_PHRASES = (
    "discarding closed connection",
    "connection is bad",
    "connection is lost",
    "the connection is closed",
    "server closed the connection",
    "terminating connection",
    "the database system is",  # ... shutting down / starting up / in recovery mode
    "Connection refused",
    "No such file or directory",
)


def connection_lost(exc: BaseException | None) -> bool:
    """True when `exc`, or an exception it came from, means the database connection is gone
    (not a statement timeout, a lock wait or a full pool, which may look alike)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BaseExceptionGroup):
            return any(connection_lost(inner) for inner in exc.exceptions)
        if isinstance(exc, psycopg_pool.PoolTimeout):
            return False  # every connection busy; the worker's own loop tells a real loss
        if isinstance(exc, psycopg.OperationalError):
            if exc.sqlstate is None or exc.sqlstate.startswith(_LOST_SQLSTATES):
                return True
        elif isinstance(exc, ConnectionError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class ConnectionLossFilter(logging.Filter):
    """While the database is away every job in flight fails, and pgqueuer, psycopg's pool and
    the stage runner log it per job and per connection (171 tracebacks and 145 ERROR lines in
    one restart under a 2,000-payment backlog). The worker says it once instead (`serve`):
    this filter drops the records about the lost connection and counts them."""

    # pgqueuer's buffers retry their last flush at shutdown, one warning per try.
    _SHUTDOWN_FLUSH = "Shutdown flush failed"

    def __init__(self) -> None:
        super().__init__()
        self.suppressed = 0
        self.lost = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._about_lost_connection(record):
            return True
        self.lost = True
        self.suppressed += 1
        return False

    def _about_lost_connection(self, record: logging.LogRecord) -> bool:
        if record.exc_info is not None and connection_lost(record.exc_info[1]):
            return True
        message = record.getMessage()
        if record.name.startswith("psycopg.pool"):
            return any(phrase in message for phrase in _POOL_LOSS_PHRASES)
        return self.lost and message.startswith(self._SHUTDOWN_FLUSH)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        for name in ("pgqueuer", "psycopg.pool", __name__, "workers.runtime.runner")
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
                        _first_line(exc),
                        delay,
                    )
                else:
                    log.debug("still no database (%s); next try in %.1fs", _first_line(exc), delay)
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
