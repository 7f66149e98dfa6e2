"""Chaos: 2,000 payments through 3 worker processes while one is SIGKILLed every 1-2 s (and
replaced), and every database backend is terminated once mid-run. Afterwards every invariant
holds and nothing is lost or duplicated."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import psycopg
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from bench import world
from tests.helpers import spawn_worker, wait_for
from tests.invariants import violations

Conn = psycopg.Connection[DictRow]
PAYMENTS = 2000
WORKERS = 3
SETTLE_TIMEOUT = 600


def payments_metadata(rnd: random.Random) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for i in range(PAYMENTS):
        meta: dict[str, object] = {
            "sessionCount": rnd.choice([10, 20, 30]),
            "timeSlot": rnd.choice(
                [
                    "7:00 AM",
                    "9 AM",
                    "11:00",
                    "1 PM",
                    "3:30 PM",
                    "16:00",
                    "5 PM",
                    "6:00 PM - 7:00 PM",
                    "19:00",
                ]
            ),
            "scheduleMode": rnd.choice(["daily", "weekdays", "weekdays", "sunday_only"]),
        }
        if rnd.random() < 0.3:
            # a past date (moves forward) and two within the one-year bound on start dates
            ahead = [date.today() + timedelta(days=d) for d in (40, 300)]
            meta["startDate"] = rnd.choice(["2020-01-01", *(d.isoformat() for d in ahead)])
        if i % 50 == 0:
            meta["sessionCount"] = 25  # a bad payment now and then: a recorded rejection
        out.append(meta)
    return out


def test_chaos(conn: Conn, db_url: str, tmp_path: Path) -> None:
    world.seed(db_url, trainers=300, students=PAYMENTS, booked_allocations=0)
    rnd = random.Random(7)
    metadata = payments_metadata(rnd)
    log = tmp_path / "workers.log"
    workers = [spawn_worker(db_url, log) for _ in range(WORKERS)]
    kills = 0
    terminated_backends = 0

    def feed() -> None:  # the payment service, 100 payments every 0.25 s
        with psycopg.connect(db_url, autocommit=True) as feeder:
            students = [
                r[0]
                for r in feeder.execute("SELECT id FROM students ORDER BY full_name").fetchall()
            ]
            courses = [r[0] for r in feeder.execute("SELECT id FROM courses").fetchall()]
            for start in range(0, PAYMENTS, 100):
                if start >= PAYMENTS // 2:
                    halfway.set()
                with feeder.transaction():
                    for i in range(start, start + 100):
                        feeder.execute(
                            "INSERT INTO payments (student_id, course_id, amount_cents, status,"
                            " metadata, confirmed_at) VALUES (%s, %s, 499900, 'succeeded', %s,"
                            " now())",
                            (students[i], courses[i % len(courses)], Jsonb(metadata[i])),
                        )
                time.sleep(0.25)

    # The backends are terminated once half the payments are in: mid-run whatever the
    # pipeline's speed (at a fixed 8 s, a pipeline that kept up settled before it).
    halfway = threading.Event()
    feeder = threading.Thread(target=feed)
    started = time.monotonic()
    feeder.start()

    def settled() -> bool:
        row = conn.execute("""SELECT
            (SELECT count(*) FROM payments) AS payments,
            (SELECT count(*) FROM pgqueuer WHERE status IN ('queued', 'picked')) AS live,
            (SELECT count(*) FROM pgqueuer WHERE status = 'failed') AS failed""").fetchone()
        return row is not None and row["payments"] == PAYMENTS and row["live"] == 0

    try:
        chaos_until = time.monotonic() + 25
        while time.monotonic() < chaos_until and not settled():
            time.sleep(rnd.uniform(1.0, 2.0))
            victim = rnd.randrange(WORKERS)
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait()
            workers[victim] = spawn_worker(db_url, log)
            kills += 1
            if terminated_backends == 0 and halfway.is_set():
                # On a loaded machine every worker may still be starting after the last kills
                # (none connected yet): the termination waits, without killing, for one that is.
                wait_for(lambda: _connected(conn) > 0, 60, "a worker to connect")
                row = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND application_name LIKE 'koding-caravan%'"
                ).fetchone()
                terminated_backends = int(row["n"]) if row else 0
        feeder.join(timeout=120)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while not settled():
            assert time.monotonic() < deadline, "the pipeline did not settle"
            assert all(w.poll() is None for w in workers), log.read_text()[-5000:]
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        # A worker respawned just before the pipeline settled may still be starting (the
        # interpreter, its imports): the stop below is meant for started workers.
        wait_for(lambda: _listening(conn) >= WORKERS, 30, "every worker to listen")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        codes = [worker.wait(timeout=60) for worker in workers]

    assert codes == [0] * WORKERS
    assert kills >= 5
    assert terminated_backends > 0
    failed = conn.execute("SELECT stage, error FROM failed_jobs").fetchall()
    assert failed == [], failed
    assert violations(conn) == {}, log.read_text()[-5000:]
    summary = dict(
        conn.execute("""SELECT
        (SELECT count(*) FROM payments) AS payments,
        (SELECT count(*) FROM student_course_purchases) AS purchases,
        (SELECT count(*) FROM payment_rejections WHERE resolved_at IS NULL) AS rejected,
        (SELECT count(*) FROM trainer_allocations WHERE status = 'approved') AS approved,
        (SELECT count(*) FROM trainer_allocations WHERE status = 'pending') AS pending,
        (SELECT count(*) FROM tutoring_sessions) AS sessions,
        (SELECT count(*) FROM pgqueuer WHERE status = 'failed') AS failed_jobs,
        (SELECT coalesce(max(starts), 0) FROM job_starts) AS max_starts""").fetchone()
        or {}
    )
    assert summary["purchases"] + summary["rejected"] == PAYMENTS
    assert summary["rejected"] == PAYMENTS // 50
    assert summary["approved"] + summary["pending"] == summary["purchases"]
    assert summary["failed_jobs"] == 0
    assert summary["approved"] > 0
    summary |= {
        "workers": WORKERS,
        "kills": kills,
        "terminated_backends": terminated_backends,
        "seconds": round(elapsed, 1),
    }
    print("chaos summary:", json.dumps(summary))
    (tmp_path / "chaos-summary.json").write_text(json.dumps(summary))


def _listening(conn: psycopg.Connection[DictRow]) -> int:
    row = conn.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'koding-caravan-listen'"
    ).fetchone()
    return int(row["n"]) if row else 0


def _connected(conn: psycopg.Connection[DictRow]) -> int:
    """The workers' backends (the stages' pool and the queue's connections)."""
    row = conn.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND application_name LIKE 'koding-caravan%'"
    ).fetchone()
    return int(row["n"]) if row else 0
