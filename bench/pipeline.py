"""Pipeline measurements: no-op baseline, throughput under a backlog, latency at a fixed
offered rate, latency on an idle pipeline. Every figure comes from the database's own
clock (stage_history.at, payments.created_at), so the client's scheduling does not count."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

STAGES = ("purchase", "allocation", "sessions")

# Payments for the given (student, course) pairs, with varied but deterministic metadata.
NEW_PAYMENTS = """
INSERT INTO payments (student_id, course_id, amount_cents, status, metadata, confirmed_at)
SELECT pair.student_id, pair.course_id, 499900, 'succeeded',
       jsonb_build_object(
           'sessionCount', (ARRAY[10, 20, 30])[1 + pair.n %% 3],
           'timeSlot', (ARRAY['7:00 AM', '9 AM', '11:00', '1 PM', '3:30 PM', '16:00', '5 PM',
                              '6:00 PM - 7:00 PM', '19:00'])[1 + pair.n %% 9],
           'scheduleMode',
           (ARRAY['daily', 'weekdays', 'weekdays', 'sunday_only'])[1 + pair.n %% 4]),
       now()
FROM unnest(%(students)s::uuid[], %(courses)s::uuid[], %(ns)s::int[])
     AS pair(student_id, course_id, n)
"""


class Pairs:
    """(student, course) pairs without a payment yet, handed out in a fixed order, so the
    offered load costs one cheap INSERT per payment."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.rows = conn.execute("""SELECT s.id, c.id FROM students s CROSS JOIN courses c
            WHERE NOT EXISTS (SELECT 1 FROM payments p
                              WHERE p.student_id = s.id AND p.course_id = c.id)
            ORDER BY s.full_name, c.title""").fetchall()
        self.used = 0

    def insert(self, conn: psycopg.Connection[Any], n: int) -> None:
        batch = self.rows[self.used : self.used + n]
        if len(batch) < n:
            raise RuntimeError(f"the world has only {len(self.rows)} unused student/course pairs")
        numbers = list(range(self.used, self.used + n))
        self.used += n
        conn.execute(
            NEW_PAYMENTS,
            {"students": [r[0] for r in batch], "courses": [r[1] for r in batch], "ns": numbers},
        )


DONE_AT = """
SELECT p.id, extract(epoch FROM p.created_at) AS paid,
       extract(epoch FROM greatest(
           (SELECT max(h.at) FROM stage_history h
             WHERE h.ref_id = p.id AND h.event IN ('succeeded', 'rejected', 'skipped')),
           (SELECT max(h.at) FROM stage_history h
              JOIN student_course_purchases pu ON h.ref_id = pu.id
             WHERE pu.payment_id = p.id AND h.event IN ('succeeded', 'skipped')),
           (SELECT max(h.at) FROM stage_history h
              JOIN trainer_allocations ta ON h.ref_id = ta.id
              JOIN student_course_purchases pu ON pu.id = ta.purchase_id
             WHERE pu.payment_id = p.id AND h.event IN ('succeeded', 'skipped')))) AS done
FROM payments p WHERE p.created_at >= to_timestamp(%(since)s)
"""

STAGE_LATENCY = """
SELECT done.stage, extract(epoch FROM done.at - started.at) AS seconds
FROM stage_history done
CROSS JOIN LATERAL (
    SELECT e.at FROM stage_history e
    WHERE e.stage = done.stage AND e.ref_id = done.ref_id AND e.event = 'enqueued'
      AND e.at <= done.at
    ORDER BY e.at DESC LIMIT 1) started
WHERE done.event IN ('succeeded', 'skipped', 'rejected') AND done.at >= to_timestamp(%(since)s)
"""


def percentiles(values: list[float]) -> dict[str, float]:
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


@contextmanager
def workers(url: str, count: int, **env: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    environment = {
        **os.environ,
        "DATABASE_URL": url,
        "KC_LOG_LEVEL": "WARNING",
        "KC_IDLE_POLL_SECONDS": "1",
        **env,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "workers", "run", "--single", "--no-migrate"], env=environment
        )
        for _ in range(count)
    ]
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            wait(lambda: _listeners(conn) >= count, 60, "workers to start")
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=120)


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
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        if progress:
            progress()
        time.sleep(0.2)


def baseline(url: str, jobs: int, processes: int, batch: int) -> dict[str, Any]:
    """pgqueuer no-op jobs per second, `processes` workers, the same driver and batch size."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO pgqueuer (priority, entrypoint, payload, status)
                        SELECT 0, 'noop', NULL, 'queued' FROM generate_series(1, %s)""",
            (jobs,),
        )
        started = time.monotonic()
        env = {**os.environ, "DATABASE_URL": url, "KC_BATCH_SIZE": str(batch)}
        procs = [
            subprocess.Popen([sys.executable, "-m", "bench.noop_worker"], env=env)
            for _ in range(processes)
        ]
        for proc in procs:
            proc.wait(timeout=600)
        elapsed = time.monotonic() - started
        left = live_jobs(conn, ("noop",))
    return {
        "jobs": jobs,
        "processes": processes,
        "seconds": round(elapsed, 2),
        "jobs_per_s": round(jobs / elapsed, 1),
        "left": left,
    }


def backlog_throughput(
    url: str, payments: int, processes: int, batch: int, progress: Callable[[int, int], None]
) -> dict[str, Any]:
    """Queue `payments` at once (one transaction) for running workers; time to the last
    stage outcome, by the database's clock."""
    with (
        workers(url, processes, KC_BATCH_SIZE=str(batch)),
        psycopg.connect(url, autocommit=True) as conn,
    ):
        pairs = Pairs(conn)
        since = db_now(conn)
        pairs.insert(conn, payments)

        def show() -> None:
            row = conn.execute(
                "SELECT count(*) FROM stage_history WHERE event IN "
                "('succeeded', 'rejected', 'skipped') AND at >= to_timestamp(%s)",
                (since,),
            ).fetchone()
            progress(int(row[0]) if row else 0, payments * 3)

        wait(lambda: live_jobs(conn, STAGES) == 0, 3600, "the backlog", show)
        row = conn.execute(
            """SELECT count(*), extract(epoch FROM max(at))
            FROM stage_history WHERE event IN ('succeeded', 'rejected', 'skipped')
            AND at >= to_timestamp(%s)""",
            (since,),
        ).fetchone()
        assert row is not None
        stage_jobs, last = int(row[0]), float(row[1])
        outcome = conn.execute(
            """SELECT
            count(*) FILTER (WHERE ta.status = 'approved') AS approved,
            count(*) FILTER (WHERE ta.status = 'pending') AS pending
            FROM payments p JOIN student_course_purchases pu ON pu.payment_id = p.id
            JOIN trainer_allocations ta ON ta.purchase_id = pu.id
            WHERE p.created_at >= to_timestamp(%s)""",
            (since,),
        ).fetchone()
    seconds = last - since
    return {
        "payments": payments,
        "processes": processes,
        "seconds": round(seconds, 2),
        "purchases_per_s": round(payments / seconds, 1),
        "stage_jobs_per_s": round(stage_jobs / seconds, 1),
        "stage_jobs": stage_jobs,
        "approved": outcome[0] if outcome else 0,
        "pending": outcome[1] if outcome else 0,
    }


def latency_at_rate(
    url: str,
    rate: float,
    seconds: float,
    processes: int,
    batch: int,
    progress: Callable[[int, int], None],
) -> dict[str, Any]:
    """Offer `rate` payments per second (each its own transaction) for `seconds`."""
    total = int(rate * seconds)
    with (
        workers(url, processes, KC_BATCH_SIZE=str(batch)),
        psycopg.connect(url, autocommit=True) as conn,
    ):
        pairs = Pairs(conn)
        since = db_now(conn)
        start = time.monotonic()
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pairs.insert(conn, 1)
            if i % 25 == 0:
                progress(i, total)
        offered = total / (time.monotonic() - start)
        wait(lambda: live_jobs(conn, STAGES) == 0, 600, "the last payments")
        done = conn.execute(DONE_AT, {"since": since}).fetchall()
        per_stage = conn.execute(STAGE_LATENCY, {"since": since}).fetchall()
    overall = percentiles([float(r[2]) - float(r[1]) for r in done if r[2] is not None])
    stages = {
        stage: percentiles([float(r[1]) for r in per_stage if r[0] == stage]) for stage in STAGES
    }
    return {
        "offered_per_s": round(offered, 1),
        "payments": total,
        "overall": overall,
        "stages": stages,
        "samples_ms": sorted(
            round((float(r[2]) - float(r[1])) * 1000, 2) for r in done if r[2] is not None
        ),
    }


def idle_latency(url: str, driver: str, samples: int, gap: float) -> dict[str, Any]:
    """One payment at a time into an idle pipeline: payment commit -> last session."""
    with workers(url, 1, KC_QUEUE_DRIVER=driver), psycopg.connect(url, autocommit=True) as conn:
        pairs = Pairs(conn)
        since = db_now(conn)
        for _ in range(samples):
            time.sleep(gap)
            pairs.insert(conn, 1)
            wait(lambda: live_jobs(conn, STAGES) == 0, 60, "the payment")
        done = conn.execute(DONE_AT, {"since": since}).fetchall()
    return {"driver": driver} | percentiles(
        [float(r[2]) - float(r[1]) for r in done if r[2] is not None]
    )
