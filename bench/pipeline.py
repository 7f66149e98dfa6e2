"""Pipeline measurements: no-op baseline, throughput under a backlog, latency at a fixed
offered rate, latency on an idle pipeline. Every figure comes from the database's own
clock (stage_history.at, payments.created_at), so the client's scheduling does not count.

Each pipeline phase pays for the orders of its own district (bench/district.sql), seeded
before its workers start, and reports what became of them (approved, pending, rejected), the
'healed' history lines in its window and the jobs in its window that were not its own
(should be 0: nothing an earlier phase left behind is picked up), and CPU seconds
(bench/cpu.py)."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from bench import world
from bench.cpu import Meter
from bench.progress import Progress

STAGES = ("purchase", "allocation", "sessions")
LOG_LEVEL = re.compile(r"\S+ \S+ (WARNING|ERROR|CRITICAL)\b")
OUTCOME_EVENTS = ("succeeded", "rejected", "skipped")

# The workers of every phase: the sweep retries a pending allocation only after a day, so a
# phase's pending purchases are never retried in a later phase (the healer keeps its default).
WORKER_ENV = {
    "KC_LOG_LEVEL": "WARNING",
    "KC_IDLE_POLL_SECONDS": "1",
    "KC_PENDING_RETRY_SECONDS": "86400",
}

# The payments of orders first..last of a phase, with varied but deterministic metadata.
NEW_PAYMENTS = """
INSERT INTO payments (id, student_id, course_id, amount_cents, status, metadata, confirmed_at)
SELECT o.payment_id, o.student_id, o.course_id, 499900, 'succeeded',
       jsonb_build_object(
           'sessionCount', (ARRAY[10, 20, 30])[1 + o.n %% 3],
           'timeSlot', (ARRAY['7:00 AM', '9 AM', '11:00', '1 PM', '3:30 PM', '16:00', '5 PM',
                              '6:00 PM - 7:00 PM', '19:00'])[1 + o.n %% 9],
           'scheduleMode',
           (ARRAY['daily', 'weekdays', 'weekdays', 'sunday_only'])[1 + o.n %% 4]),
       now()
FROM bench.orders o
WHERE o.phase = %(phase)s::text AND o.n BETWEEN %(first)s::int AND %(last)s::int
"""

# What became of a phase's payments.
OUTCOMES = """
SELECT count(*) AS payments,
       count(*) FILTER (WHERE ta.status = 'approved') AS approved,
       count(*) FILTER (WHERE ta.status = 'pending') AS pending,
       count(*) FILTER (WHERE pu.id IS NULL AND r.payment_id IS NOT NULL) AS rejected,
       count(*) FILTER (WHERE ta.id IS NULL AND r.payment_id IS NULL) AS unfinished
FROM bench.orders o
JOIN payments p ON p.id = o.payment_id
LEFT JOIN student_course_purchases pu ON pu.payment_id = o.payment_id
LEFT JOIN trainer_allocations ta
       ON ta.purchase_id = pu.id AND ta.status IN ('pending', 'approved')
LEFT JOIN payment_rejections r ON r.payment_id = o.payment_id AND r.resolved_at IS NULL
WHERE o.phase = %(phase)s::text
"""

# The history lines of a phase's window, its own (bench.own_refs: the rows of its orders)
# and the others. A join, not IN (...): at 100k orders the own rows do not fit in work_mem
# as a hashed subplan.
WINDOW = """
WITH lines AS (
    SELECT h.stage, h.ref_id, h.event, h.at, own.ref_id IS NOT NULL AS own
    FROM stage_history h
    LEFT JOIN bench.own_refs(%(phase)s::text) AS own(ref_id) ON own.ref_id = h.ref_id
    WHERE h.at >= to_timestamp(%(since)s::float8) AND h.at <= to_timestamp(%(until)s::float8)
)
SELECT count(*) FILTER (WHERE own AND event = ANY (%(outcomes)s::text[])) AS stage_jobs,
       extract(epoch FROM max(at) FILTER (WHERE own AND event = ANY (%(outcomes)s::text[])))
           AS last_outcome,
       count(*) FILTER (WHERE event = 'healed') AS healed,
       count(DISTINCT (stage, ref_id)) FILTER (WHERE NOT own) AS foreign_jobs,
       count(*) FILTER (WHERE NOT own) AS foreign_lines,
       count(*) FILTER (WHERE own AND event = 'failed') AS failed_attempts
FROM lines
"""

# Payment commit -> its last stage outcome (purchase, allocation or sessions), per payment.
# Set-based (joins and one GROUP BY): a correlated subquery per payment reached the
# allocations by a scan each (no index on trainer_allocations.purchase_id for every status)
# and took 938 s for 100k payments.
DONE_AT = """
WITH mine AS (
    SELECT p.id AS payment_id, p.created_at, pu.id AS purchase_id
    FROM bench.orders o
    JOIN payments p ON p.id = o.payment_id
    LEFT JOIN student_course_purchases pu ON pu.payment_id = p.id
    WHERE o.phase = %(phase)s::text
), refs AS (
    SELECT payment_id, payment_id AS ref_id FROM mine
    UNION ALL
    SELECT payment_id, purchase_id FROM mine WHERE purchase_id IS NOT NULL
    UNION ALL
    SELECT m.payment_id, ta.id FROM mine m JOIN trainer_allocations ta
    ON ta.purchase_id = m.purchase_id
)
SELECT m.payment_id, extract(epoch FROM m.created_at) AS paid,
       extract(epoch FROM max(h.at)) AS done
FROM mine m
JOIN refs r ON r.payment_id = m.payment_id
LEFT JOIN stage_history h
       ON h.ref_id = r.ref_id AND h.event IN ('succeeded', 'rejected', 'skipped')
GROUP BY m.payment_id, m.created_at
"""

STAGE_LATENCY = """
SELECT done.stage, extract(epoch FROM done.at - started.at) AS seconds
FROM stage_history done
CROSS JOIN LATERAL (
    SELECT e.at FROM stage_history e
    WHERE e.stage = done.stage AND e.ref_id = done.ref_id AND e.event = 'enqueued'
      AND e.at <= done.at
    ORDER BY e.at DESC LIMIT 1) started
WHERE done.event IN ('succeeded', 'skipped', 'rejected')
  AND done.at >= to_timestamp(%(since)s::float8) AND done.at <= to_timestamp(%(until)s::float8)
"""


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 (nearest rank) and mean of seconds, in milliseconds."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50_ms": round(at(0.50) * 1000, 1),
        "p95_ms": round(at(0.95) * 1000, 1),
        "p99_ms": round(at(0.99) * 1000, 1),
        "mean_ms": round(statistics.mean(ordered) * 1000, 1),
    }


def db_now(conn: psycopg.Connection[Any]) -> float:
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
    assert row is not None
    return float(row[0])


def live_jobs(conn: psycopg.Connection[Any], entrypoints: tuple[str, ...]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pgqueuer WHERE status IN ('queued', 'picked') "
        "AND entrypoint = ANY(%s)",
        (list(entrypoints),),
    ).fetchone()
    return int(row[0]) if row else 0


def any_live_job(conn: psycopg.Connection[Any]) -> bool:
    """Cheap enough to poll under a 100k backlog (count(*) over the queue is not)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pgqueuer WHERE status IN ('queued', 'picked') "
        "AND entrypoint = ANY(%s))",
        (list(STAGES),),
    ).fetchone()
    return bool(row and row[0])


# What autovacuum would do during a phase, when the server runs without it (this machine's
# does): a queue whose done jobs are deleted piles up dead rows, and tables that grow from
# a few thousand rows to millions keep the statistics of their start, so the planner picks
# plans for tables they no longer are (a 100k backlog without it: 4 purchases/s, the
# dequeue sorting on disk). A production server keeps autovacuum on.
MAINTENANCE_SECONDS = 20.0
MAINTAINED = (
    "VACUUM (ANALYZE) pgqueuer",
    "ANALYZE payments, student_course_purchases, trainer_allocations, tutoring_sessions, "
    "stage_history, job_starts",
)


def autovacuum_on(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('autovacuum')::boolean").fetchone()
    return bool(row and row[0])


@contextmanager
def maintenance(url: str) -> Iterator[None]:
    """Autovacuum's work every MAINTENANCE_SECONDS while the block runs, if the server has
    autovacuum off; nothing otherwise."""
    if autovacuum_on(url):
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.wait(MAINTENANCE_SECONDS):
                for statement in MAINTAINED:
                    conn.execute(statement)

    thread = threading.Thread(target=loop, name="bench-maintenance", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def workers(url: str, count: int, log: Path, **env: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` worker processes, their output into `log`, and autovacuum's work in its
    place when the server runs without it (`maintenance`); stopped on exit."""
    environment = {**os.environ, "DATABASE_URL": url, **WORKER_ENV, **env}
    with log.open("ab") as output:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "workers", "run", "--single", "--no-migrate"],
                env=environment,
                stdout=output,
                stderr=output,
            )
            for _ in range(count)
        ]
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                wait(lambda: _listeners(conn) >= count, 60, "workers to start")
            with maintenance(url):
                yield procs
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=120)


def log_levels(log: Path) -> dict[str, int]:
    """WARNING and ERROR lines in a worker log (workers/cli.py's format: date, time,
    level); a traceback's lines are not counted."""
    found = {"WARNING": 0, "ERROR": 0}
    for line in log.read_text(errors="replace").splitlines():
        level = LOG_LEVEL.match(line)
        if level and level[1] in found:
            found[level[1]] += 1
    return found


def _listeners(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
        "current_database() AND application_name = 'koding-caravan-listen'"
    ).fetchone()
    return int(row[0]) if row else 0


def wait(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    progress: Callable[[], None] | None = None,
    every: float = 0.2,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        if progress:
            progress()
        time.sleep(every)


def wait_for_pipeline(
    conn: psycopg.Connection[Any], timeout: float, what: str, progress: Callable[[], None] | None
) -> None:
    """Until no stage job is queued or running. Polls every 0.5 s: the end of a phase is
    read from the database's clock afterwards, so the poll's delay does not count."""
    wait(lambda: not any_live_job(conn), timeout, what, progress, every=0.5)


def baseline(url: str, jobs: int, processes: int, batch: int) -> dict[str, Any]:
    """pgqueuer no-op jobs per second, `processes` workers, the same driver and batch size."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO pgqueuer (priority, entrypoint, payload, status)
                        SELECT 0, 'noop', NULL, 'queued' FROM generate_series(1, %s)""",
            (jobs,),
        )
        meter = Meter(conn)
        meter.start()
        started = time.monotonic()
        env = {**os.environ, "DATABASE_URL": url, "KC_BATCH_SIZE": str(batch)}
        procs = [
            subprocess.Popen([sys.executable, "-m", "bench.noop_worker"], env=env)
            for _ in range(processes)
        ]
        for proc in procs:
            proc.wait(timeout=600)
        elapsed = time.monotonic() - started
        meter.stop()
        left = live_jobs(conn, ("noop",))
    return {
        "jobs": jobs,
        "processes": processes,
        "seconds": round(elapsed, 2),
        "jobs_per_s": round(jobs / elapsed, 1),
        "left": left,
    } | meter.figures()


class Phase:
    """One pipeline phase: its district (seeded on creation, before its workers start), its
    window on the database's clock, its CPU meter, and what it reports."""

    def __init__(self, url: str, name: str, payments: int, out: Path) -> None:
        self.url = url
        self.name = name
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / f"workers-{name}.log"
        self.log.unlink(missing_ok=True)
        self.district = world.add_district(url, name, payments)
        self.since = self.until = 0.0
        self.meter: Meter | None = None

    def pay(self, conn: psycopg.Connection[Any], first: int, last: int) -> None:
        conn.execute(NEW_PAYMENTS, {"phase": self.name, "first": first, "last": last})

    def start(self, conn: psycopg.Connection[Any], procs: list[subprocess.Popen[bytes]]) -> None:
        self.meter = Meter(conn, [p.pid for p in procs])
        self.meter.start()
        self.since = db_now(conn)

    def stop(self, conn: psycopg.Connection[Any]) -> None:
        assert self.meter is not None
        self.until = db_now(conn)
        self.meter.stop()

    def logged(self) -> dict[str, Any]:
        """Its workers' log, read once they have exited (all of it is written)."""
        return {
            "worker_log": str(self.log),
            "worker_log_lines": log_levels(self.log) if self.log.exists() else {},
        }

    def report(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        """Outcomes, the window's own and foreign history, CPU; and how long the report's
        own queries took (they must stay quick at 100k)."""
        started = time.perf_counter()
        outcome = conn.execute(OUTCOMES, {"phase": self.name}).fetchone()
        window = conn.execute(
            WINDOW,
            {
                "phase": self.name,
                "since": self.since,
                "until": self.until,
                "outcomes": list(OUTCOME_EVENTS),
            },
        ).fetchone()
        assert outcome is not None and window is not None and self.meter is not None
        payments, approved, pending, rejected, unfinished = (int(v) for v in outcome)
        stage_jobs, last, healed, foreign_jobs, foreign_lines, failed = window
        return {
            "phase": self.name,
            "district_trainers": self.district.trainers,
            "district_km": self.district.side_km,
            "setup_seconds": round(self.district.seconds, 1),
            "payments": payments,
            "approved": approved,
            "pending": pending,
            "rejected": rejected,
            "unfinished": unfinished,
            "approved_share": round(approved / payments, 3) if payments else None,
            "stage_jobs": int(stage_jobs),
            "last_outcome": None if last is None else float(last),
            "healed_lines": int(healed),
            "foreign_jobs": int(foreign_jobs),
            "foreign_lines": int(foreign_lines),
            "failed_attempts": int(failed),
            "report_query_seconds": round(time.perf_counter() - started, 2),
        } | self.meter.figures()


def backlog_throughput(
    url: str,
    payments: int,
    processes: int,
    batch: int,
    out: Path,
    progress: Progress,
    name: str | None = None,
) -> dict[str, Any]:
    """Queue `payments` at once (one transaction) for running workers; time to the last
    stage outcome, by the database's clock."""
    phase = Phase(url, name or f"backlog-{payments}", payments, out)
    with (
        workers(url, processes, phase.log, KC_BATCH_SIZE=str(batch)) as procs,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        phase.start(conn, procs)
        phase.pay(conn, 1, payments)
        shown = [0.0]

        def show() -> None:  # only on a terminal, and at most every 2 s: it counts rows
            if not progress.interactive or time.monotonic() - shown[0] < 2:
                return
            shown[0] = time.monotonic()
            row = conn.execute(
                "SELECT count(*) FROM stage_history WHERE event = ANY(%s) "
                "AND at >= to_timestamp(%s)",
                (list(OUTCOME_EVENTS), phase.since),
            ).fetchone()
            progress(int(row[0]) if row else 0, payments * 3)

        wait_for_pipeline(conn, 4 * 3600, "the backlog", show)
        phase.stop(conn)
        figures = phase.report(conn)
    seconds = (figures["last_outcome"] or phase.until) - phase.since
    return (
        figures
        | phase.logged()
        | {
            "processes": processes,
            "seconds": round(seconds, 2),
            "purchases_per_s": round(payments / seconds, 1),
            "stage_jobs_per_s": round(figures["stage_jobs"] / seconds, 1),
        }
    )


def latency_at_rate(
    url: str,
    rate: float,
    seconds: float,
    processes: int,
    batch: int,
    out: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Offer `rate` payments per second (each its own transaction) for `seconds`."""
    total = int(rate * seconds)
    phase = Phase(url, f"rate-{rate:g}", total, out)
    with (
        workers(url, processes, phase.log, KC_BATCH_SIZE=str(batch)) as procs,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        phase.start(conn, procs)
        start = time.monotonic()
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            phase.pay(conn, i + 1, i + 1)
            if i % 25 == 0:
                progress(i, total)
        offered = total / (time.monotonic() - start)
        wait_for_pipeline(conn, 600, "the last payments", None)
        phase.stop(conn)
        figures = phase.report(conn)
        done = conn.execute(DONE_AT, {"phase": phase.name}).fetchall()
        per_stage = conn.execute(
            STAGE_LATENCY, {"since": phase.since, "until": phase.until}
        ).fetchall()
    latencies = [float(r[2]) - float(r[1]) for r in done if r[2] is not None]
    return (
        figures
        | phase.logged()
        | {
            "offered_per_s": round(offered, 1),
            "overall": percentiles(latencies),
            "stages": {
                stage: percentiles([float(r[1]) for r in per_stage if r[0] == stage])
                for stage in STAGES
            },
            "samples_ms": sorted(round(s * 1000, 2) for s in latencies),
        }
    )


def idle_latency(
    url: str, driver: str, samples: int, gap: float, out: Path, progress: Progress
) -> dict[str, Any]:
    """One payment at a time into an idle pipeline: payment commit -> last stage."""
    phase = Phase(url, f"idle-{driver}", samples, out)
    with (
        workers(url, 1, phase.log, KC_QUEUE_DRIVER=driver) as procs,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        phase.start(conn, procs)
        for i in range(samples):
            time.sleep(gap)
            phase.pay(conn, i + 1, i + 1)
            wait_for_pipeline(conn, 60, "the payment", None)
            progress(i + 1, samples)
        phase.stop(conn)
        figures = phase.report(conn)
        done = conn.execute(DONE_AT, {"phase": phase.name}).fetchall()
    latencies = [float(r[2]) - float(r[1]) for r in done if r[2] is not None]
    return figures | phase.logged() | {"driver": driver} | percentiles(latencies)
