"""The scarce-trainer burst (issue 22): more students than trainers, all at once.

One neighbourhood, one course, 20 active trainers who all teach it (capacity 4 to 8 by
rating, available 07:00-21:00 every day) and 200 students; the 200 succeeded payments are
inserted in one transaction (daily courses of 10 sessions at seven different slots) while
the workers run with `make run-workers`' defaults. About half the purchases can be approved;
the others wait, pending. Then two changes that could help the waiting ones: a new trainer
(one INSERT, then their week in one INSERT of 7 availability rows, one transaction), and
one trainer's availability rewritten (one UPDATE of 7 rows).

Printed: settle time (every purchase pending, or approved with all its sessions, from the
burst's commit), deadlocks (pg_stat_database, and the workers' log), approval -> sessions
latency (the allocation's allocated_at to the sessions stage's `succeeded` line for it),
allocation runs and `enqueued` history lines per pending purchase, failed attempts.
Every figure comes from the database's clock.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from bench import pipeline, world
from bench.cpu import Meter
from bench.progress import Progress

TRAINERS = 20
STUDENTS = 200
SLOTS = ("7:00 AM", "9:00 AM", "11:00 AM", "1:00 PM", "3:00 PM", "5:00 PM", "7:00 PM")
# Ratings whose capacities are 4, 5, 6, 7 and 8 (kc_trainer_capacity), four trainers each.
RATINGS = (3.0, 3.3, 3.8, 4.3, 4.8)
HOME = (12.9716, 77.5946)

# `make run-workers`' defaults (pipeline.WORKER_ENV is for the other phases: no sweep).
WORKER_ENV = {"KC_IDLE_POLL_SECONDS": "5", "KC_PENDING_RETRY_SECONDS": "300"}

SEED = """
WITH c AS (
    INSERT INTO courses (title, category, subcategory)
    VALUES ('Robotics with Arduino', 'Robotics', 'Arduino') RETURNING id
), t AS (
    INSERT INTO trainers (full_name, rating, specialties, base_lat, base_lng,
                          service_radius_km, status)
    SELECT 'Scarce trainer ' || i,
           (%(ratings)s::numeric[])[1 + i %% cardinality(%(ratings)s::numeric[])],
           ARRAY['Robotics'], %(lat)s::float8 + (i %% 5) * 0.002,
           %(lng)s::float8 + (i / 5) * 0.002,
           10, 'active'
    FROM generate_series(0, %(trainers)s::int - 1) AS i
    RETURNING id
), a AS (
    INSERT INTO trainer_availability (trainer_id, weekday, slot_start, slot_end)
    SELECT t.id, d, time '07:00', time '21:00' FROM t CROSS JOIN generate_series(1, 7) AS d
)
INSERT INTO students (full_name, home_lat, home_lng)
SELECT 'Scarce student ' || i, %(lat)s::float8 + (i %% 20) * 0.0005,
       %(lng)s::float8 + (i / 20) * 0.0005
FROM generate_series(0, %(students)s::int - 1) AS i
"""

BURST = """
INSERT INTO payments (student_id, course_id, amount_cents, status, metadata, confirmed_at)
SELECT s.id, c.id, 499900, 'succeeded',
       jsonb_build_object('sessionCount', 10, 'scheduleMode', 'daily',
                          'timeSlot',
                          (%(slots)s::text[])[1 + (s.n - 1) %% cardinality(%(slots)s::text[])]),
       now()
FROM (SELECT id, row_number() OVER (ORDER BY full_name) AS n FROM students) s
CROSS JOIN courses c
"""

# Every purchase has a live allocation: polled every 0.1 s while the burst runs, so cheap (an
# index scan); SETTLED, which reads sessions, only once this holds.
LIVE = """
SELECT count(*) = %(students)s::int FROM trainer_allocations WHERE status IN ('pending', 'approved')
"""

# Every purchase pending, or approved with all its sessions (the burst has settled).
SETTLED = """
SELECT count(*) = %(students)s::int
       AND count(*) FILTER (WHERE ta.status = 'approved')
           = count(*) FILTER (WHERE ta.status = 'approved' AND s.n = pu.purchase_tier)
FROM trainer_allocations ta
JOIN student_course_purchases pu ON pu.id = ta.purchase_id
LEFT JOIN (SELECT allocation_id, count(*) AS n FROM tutoring_sessions GROUP BY allocation_id) s
       ON s.allocation_id = ta.id
WHERE ta.status IN ('pending', 'approved')
"""

# Approval -> sessions written: allocated_at (the approving transaction's clock) to the
# sessions stage's `succeeded` line for that allocation (written just before its commit).
APPROVAL_TO_SESSIONS = """
SELECT extract(epoch FROM h.at - ta.allocated_at) AS seconds
FROM trainer_allocations ta
CROSS JOIN LATERAL (SELECT min(at) AS at FROM stage_history
                    WHERE stage = 'sessions' AND ref_id = ta.id AND event = 'succeeded') h
WHERE ta.status = 'approved' AND h.at IS NOT NULL
"""

OUTCOMES = """
SELECT count(*) FILTER (WHERE status = 'approved') AS approved,
       count(*) FILTER (WHERE status = 'pending') AS pending
FROM trainer_allocations WHERE status IN ('pending', 'approved')
"""

# Per pending purchase, since a moment: allocation runs (outcomes and failed attempts) and
# `enqueued` history lines.
PER_PENDING = """
SELECT ta.purchase_id,
       count(h.*) FILTER (WHERE h.event IN ('succeeded', 'skipped', 'rejected', 'failed'))
           AS runs,
       count(h.*) FILTER (WHERE h.event = 'enqueued') AS enqueued
FROM trainer_allocations ta
LEFT JOIN stage_history h ON h.stage = 'allocation' AND h.ref_id = ta.purchase_id
     AND h.at >= to_timestamp(%(since)s::float8)
WHERE ta.status = 'pending'
GROUP BY ta.purchase_id
"""

# When each stage did its work after the burst (seconds from `since`).
TIMELINE = """
SELECT stage, count(*) AS outcomes,
       round(extract(epoch FROM min(at) - to_timestamp(%(since)s::float8))::numeric, 2) AS first,
       round(extract(epoch FROM max(at) - to_timestamp(%(since)s::float8))::numeric, 2) AS last
FROM stage_history
WHERE event IN ('succeeded', 'skipped', 'rejected') AND at >= to_timestamp(%(since)s::float8)
GROUP BY stage
"""

FAILED = """
SELECT count(*) FROM stage_history
WHERE event = 'failed' AND at >= to_timestamp(%(since)s::float8)
"""

# Attempts that failed on a deadlock (each is also a deadlock the server counted).
DEADLOCKED = """
SELECT count(*) FROM stage_history
WHERE event = 'failed' AND at >= to_timestamp(%(since)s::float8)
  AND error ->> 'type' = 'DeadlockDetected'
"""

NEW_TRAINER = """
WITH t AS (
    INSERT INTO trainers (full_name, rating, specialties, base_lat, base_lng,
                          service_radius_km, status)
    VALUES ('Scarce trainer, new', 4.8, ARRAY['Robotics'], %(lat)s::float8, %(lng)s::float8,
            10, 'active')
    RETURNING id
)
SELECT id FROM t
"""


def seed(conn: psycopg.Connection[Any]) -> None:
    """The course, the 20 trainers with their week, the 200 students (tests use it too)."""
    conn.execute(
        SEED,
        {
            "ratings": list(RATINGS),
            "trainers": TRAINERS,
            "students": STUDENTS,
            "lat": HOME[0],
            "lng": HOME[1],
        },
    )


def pay(conn: psycopg.Connection[Any]) -> None:
    """The 200 succeeded payments, in one statement (commit it to start the burst)."""
    conn.execute(BURST, {"slots": list(SLOTS)})


def expected_approvals() -> int:
    """Every slot has more students than trainers, so each trainer ends full or busy at all
    seven slots: min(capacity, 7) students each (116)."""
    capacity = {3.0: 4, 3.3: 5, 3.8: 6, 4.3: 7, 4.8: 8}
    return sum(min(capacity[RATINGS[i % len(RATINGS)]], len(SLOTS)) for i in range(TRAINERS))


def deadlocks(conn: psycopg.Connection[Any]) -> int:
    """The database's deadlock count. A backend reports it when it is idle or exits: read
    after the workers have stopped."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    return int(row[0]) if row else 0


def _count(conn: psycopg.Connection[Any], query: str, since: float) -> int:
    row = conn.execute(query, {"since": since}).fetchone()
    return int(row[0]) if row else 0


def _settled(conn: psycopg.Connection[Any]) -> bool:
    for query in (LIVE, SETTLED):
        row = conn.execute(query, {"students": STUDENTS}).fetchone()
        if not (row and row[0]):
            return False
    return True


def _allocation_jobs(conn: psycopg.Connection[Any]) -> int:
    """Allocation and sessions jobs queued (due now or later) or running."""
    return pipeline.live_jobs(conn, ("allocation", "sessions"))


def _per_pending(conn: psycopg.Connection[Any], since: float) -> dict[str, Any]:
    rows = conn.execute(PER_PENDING, {"since": since}).fetchall()
    if not rows:
        return {"pending": 0}
    runs = [int(r[1]) for r in rows]
    enqueued = [int(r[2]) for r in rows]
    return {
        "pending": len(rows),
        "runs_mean": round(sum(runs) / len(rows), 2),
        "runs_max": max(runs),
        "enqueued_mean": round(sum(enqueued) / len(rows), 2),
        "enqueued_max": max(enqueued),
    }


def _wait_settled(
    conn: psycopg.Connection[Any], since: float, timeout: float
) -> tuple[float | None, float | None]:
    """(seconds from `since` until settled, until no allocation or sessions job is left),
    by the database's clock, polled every 0.1 s; None when not within `timeout`."""
    deadline = time.monotonic() + timeout
    settled: float | None = None
    quiet: float | None = None
    while time.monotonic() < deadline and quiet is None:
        if settled is None and _settled(conn):
            settled = pipeline.db_now(conn) - since
        if settled is not None and _allocation_jobs(conn) == 0:
            quiet = pipeline.db_now(conn) - since
        time.sleep(0.1)
    return settled, quiet


def _burst(conn: psycopg.Connection[Any], pids: list[int]) -> dict[str, Any]:
    meter = Meter(conn, pids)
    meter.start()
    with conn.transaction():
        pay(conn)
    paid = pipeline.db_now(conn)
    settled, quiet = _wait_settled(conn, paid, 300)
    meter.stop()
    latency = [float(r[0]) for r in conn.execute(APPROVAL_TO_SESSIONS).fetchall()]
    approved, pending = conn.execute(OUTCOMES).fetchone() or (0, 0)
    return {
        "approved": int(approved),
        "pending": int(pending),
        "settle_s": None if settled is None else round(settled, 2),
        "queue_empty_s": None if quiet is None else round(quiet, 2),
        "deadlocked_attempts": _count(conn, DEADLOCKED, paid - 1),
        "failed_attempts": _count(conn, FAILED, paid - 1),
        "approval_to_sessions": pipeline.percentiles(latency)
        | {"max_ms": round(max(latency) * 1000, 1) if latency else None},
        "per_pending": _per_pending(conn, paid - 1),
        "stages": {
            r[0]: {"outcomes": int(r[1]), "first_s": float(r[2]), "last_s": float(r[3])}
            for r in conn.execute(TIMELINE, {"since": paid}).fetchall()
        },
    } | meter.figures()


def _changes(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """A new trainer with their week (one transaction), then one trainer's week rewritten
    (one UPDATE of 7 rows): each may help, so each waiting purchase is tried at most twice."""
    changed = pipeline.db_now(conn)
    with conn.transaction():
        row = conn.execute(NEW_TRAINER, {"lat": HOME[0], "lng": HOME[1]}).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO trainer_availability (trainer_id, weekday, slot_start, slot_end) "
            "SELECT %s, d, time '07:00', time '21:00' FROM generate_series(1, 7) AS d",
            (row[0],),
        )
    with conn.transaction():
        conn.execute(
            "UPDATE trainer_availability SET slot_start = time '06:00' "
            "WHERE trainer_id = (SELECT id FROM trainers ORDER BY full_name LIMIT 1)"
        )
    _, quiet = _wait_settled(conn, changed, 300)
    approved, pending = conn.execute(OUTCOMES).fetchone() or (0, 0)
    return {
        "approved": int(approved),
        "pending": int(pending),
        "queue_empty_s": None if quiet is None else round(quiet, 2),
        "deadlocked_attempts": _count(conn, DEADLOCKED, changed),
        "per_pending": _per_pending(conn, changed),
    }


def measure(admin_url: str, processes: int, out: Path, progress: Progress) -> dict[str, Any]:
    """The scarce-trainer burst and the two helpful changes, on a database of its own."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "workers-scarce.log"
    log.unlink(missing_ok=True)
    with world.fresh_database(admin_url) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            seed(conn)
            conn.execute("VACUUM ANALYZE")
            before = deadlocks(conn)
        with (
            pipeline.workers(url, processes, log, **WORKER_ENV) as procs,
            psycopg.connect(url, autocommit=True) as conn,
        ):
            progress(0, 2)
            burst = _burst(conn, [proc.pid for proc in procs])
            progress(1, 2)
            changes = _changes(conn)
            progress(2, 2)
        with psycopg.connect(url, autocommit=True) as conn:
            server_deadlocks = deadlocks(conn) - before
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return {
        "trainers": TRAINERS,
        "students": STUDENTS,
        "processes": processes,
        "burst": burst,
        "changes": changes,
        "deadlocks": server_deadlocks,
        "worker_log": str(log),
        "worker_log_lines": pipeline.log_levels(log) if log.exists() else {},
        "worker_log_deadlocks": sum(
            1 for line in lines if pipeline.LOG_LEVEL.match(line) and "deadlock detected" in line
        ),
    }
