"""Business events (issue 23): what the outbox costs the pipeline, and the relay's speed.

- The outbox's cost: the same backlog twice, in districts of their own, with the event
  triggers disabled and then enabled (then once more each, the other way round, so that a
  machine growing busier during the run favours neither): purchases/s with and without.
- The relay: events/s when it catches up with a backlog of events written while it was
  away, and the latency from a transaction's commit to a subscriber of `business-events`
  receiving its event (one event at a time into an idle relay), both against a redis-server
  of the bench's own on a free port.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, LiteralString

import psycopg
import redis
from psycopg import sql

from bench.pipeline import backlog_throughput, percentiles
from bench.progress import Progress
from workers.events.relay import CHANNEL, CONSUMER, Relay
from workers.settings import Settings

# The triggers that write the outbox (migration 0017).
EVENT_TRIGGERS = {
    "student_course_purchases": (
        "student_course_purchases_events_inserted",
        "student_course_purchases_events_updated",
    ),
    "trainer_allocations": (
        "trainer_allocations_events_inserted",
        "trainer_allocations_events_updated",
    ),
    "tutoring_sessions": ("tutoring_sessions_events_inserted", "tutoring_sessions_events_updated"),
}

# One event of the size a notification has (~800 bytes), written as the triggers write.
WRITE_EVENTS = """
SELECT kc_store_events(array_agg(NULL::uuid), array_agg(kc_event_notification(
    %(prefix)s::text || n, gen_random_uuid(), 'student', 'session', 'Session Scheduled',
    'Your 10 sessions of "Robotics with Arduino" with Ravi Kumar have been scheduled, '
    || 'starting Monday, December 7, 2026 at 5:00 PM. Please be ready!',
    jsonb_build_object('trainerName', 'Ravi Kumar', 'courseName', 'Robotics with Arduino',
                       'scheduledDate', '2026-12-07', 'scheduledTime', '5:00 PM',
                       'sessionCount', 10, 'type', 'session_scheduled',
                       'trainerId', gen_random_uuid(), 'allocationId', gen_random_uuid(),
                       'courseId', gen_random_uuid(), 'purchaseId', gen_random_uuid()),
    jsonb_build_object('purchaseId', gen_random_uuid()), now())))
FROM generate_series(1, %(count)s::integer) AS n
"""


def set_event_triggers(url: str, enabled: bool) -> None:
    verb: LiteralString = "ENABLE" if enabled else "DISABLE"
    with psycopg.connect(url, autocommit=True) as conn:
        for table, triggers in EVENT_TRIGGERS.items():
            for trigger in triggers:
                conn.execute(
                    sql.SQL("ALTER TABLE {} {} TRIGGER {}").format(
                        sql.Identifier(table), sql.SQL(verb), sql.Identifier(trigger)
                    )
                )


def outbox_cost(
    url: str, payments: int, processes: int, batch: int, out: Path, progress: Progress
) -> dict[str, Any]:
    """purchases/s and CPU per purchase of the same backlog with the outbox off and on,
    off-on-on-off."""
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    try:
        for i, mode in enumerate(("off", "on", "on", "off")):
            set_event_triggers(url, mode == "on")
            figures = backlog_throughput(
                url, payments, processes, batch, out, progress, name=f"outbox-{mode}-{i}"
            )
            runs[mode].append(figures)
    finally:
        set_event_triggers(url, True)
    rate = {mode: statistics.mean(r["purchases_per_s"] for r in runs[mode]) for mode in runs}
    # CPU per purchase (the workers and this database's backends): on a machine shared with
    # other work it moves less than the wall clock does.
    cpu = {
        mode: statistics.mean(
            1000 * (r["workers_cpu_s"] + (r["postgres_db_cpu_s"] or 0)) / payments
            for r in runs[mode]
        )
        for mode in runs
    }
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM business_events e JOIN student_course_purchases pu "
            "ON pu.id = e.purchase_id JOIN bench.orders o ON o.payment_id = pu.payment_id "
            "WHERE o.phase LIKE 'outbox-on-%%'"
        ).fetchone()
    events = int(row[0]) if row else 0
    return {
        "payments": payments,
        "purchases_per_s_off": [r["purchases_per_s"] for r in runs["off"]],
        "purchases_per_s_on": [r["purchases_per_s"] for r in runs["on"]],
        "mean_off": round(rate["off"], 1),
        "mean_on": round(rate["on"], 1),
        "cost": round(1 - rate["on"] / rate["off"], 3),
        "cpu_ms_per_purchase_runs": {
            mode: [
                round(1000 * (r["workers_cpu_s"] + (r["postgres_db_cpu_s"] or 0)) / payments, 2)
                for r in runs[mode]
            ]
            for mode in runs
        },
        "cpu_ms_per_purchase_off": round(cpu["off"], 2),
        "cpu_ms_per_purchase_on": round(cpu["on"], 2),
        "cpu_cost": round(cpu["on"] / cpu["off"] - 1, 3),
        "events_per_purchase": round(events / (2 * payments), 2),
        "approved_share_on": [r["approved_share"] for r in runs["on"]],
    }


class _Redis:
    """A redis-server of the bench's own, on a free port, in a temporary folder."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.folder = Path(tempfile.mkdtemp(prefix="kc-bench-redis-"))
        binary = shutil.which("redis-server")
        assert binary is not None
        options = {"--port": str(self.port), "--bind": "127.0.0.1", "--save": ""}
        options |= {"--appendonly": "no", "--dir": str(self.folder)}
        self.process = subprocess.Popen(
            [binary, *(item for pair in options.items() for item in pair)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=self.port) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def relay_figures(url: str, backlog: int, samples: int) -> dict[str, Any]:
    """The relay's events/s over a backlog and its commit -> subscriber latency."""
    if shutil.which("redis-server") is None:
        return {"skipped": "redis-server is not installed (apt-get install redis-server)"}
    server = _Redis()
    try:
        return _measure_relay(url, server, backlog, samples)
    finally:
        server.close()


def _measure_relay(url: str, server: _Redis, backlog: int, samples: int) -> dict[str, Any]:
    settings = Settings(DATABASE_URL=url, REDIS_URL=server.url)  # type: ignore[call-arg]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT register_event_consumer(%s)", (CONSUMER,))
        for start in range(0, backlog, 1000):  # written while no relay runs
            count = min(1000, backlog - start)
            conn.execute(WRITE_EVENTS, {"prefix": f"bench-backlog-{start}-", "count": count})
        conn.execute("SELECT count(*) FROM events_after(0, 1)")  # numbered
        last = _last(conn)
        relay = Relay(url, server.url, settings)
        thread = threading.Thread(target=relay.run, daemon=True)
        started = time.perf_counter()
        thread.start()
        while _position(conn) < last:
            time.sleep(0.01)
        catch_up = time.perf_counter() - started

        received: dict[str, float] = {}
        pubsub = redis.Redis(port=server.port).pubsub()
        pubsub.subscribe(CHANNEL)
        pubsub.get_message(timeout=5)
        listening = threading.Event()

        def listen() -> None:
            while not listening.is_set():
                message = pubsub.get_message(timeout=0.1)
                if message and message["type"] == "message":
                    received[json.loads(message["data"])["eventId"]] = time.perf_counter()

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        latencies: list[float] = []
        for i in range(samples):
            conn.execute(WRITE_EVENTS, {"prefix": f"bench-latency-{i}-", "count": 1})
            committed = time.perf_counter()  # autocommit: the commit has returned
            wanted = _event_of(conn, f"bench-latency-{i}-1")
            deadline = time.monotonic() + 10
            while wanted not in received and time.monotonic() < deadline:
                time.sleep(0.0005)
            if wanted in received:
                latencies.append(received[wanted] - committed)
            time.sleep(0.02)
        listening.set()
        listener.join(timeout=5)
        pubsub.close()
        relay.stop.set()
        thread.join(timeout=30)
    return {
        "backlog_events": backlog,
        "catch_up_seconds": round(catch_up, 2),
        "events_per_s": round(backlog / catch_up, 1),
        "latency_samples": len(latencies),
        "latency_lost": samples - len(latencies),
    } | percentiles(latencies)


def _last(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT last_position FROM business_event_sequencer").fetchone()
    return int(row[0]) if row else 0


def _position(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT position FROM business_event_consumers WHERE consumer = %s", (CONSUMER,)
    ).fetchone()
    return int(row[0]) if row else 0


def _event_of(conn: psycopg.Connection[Any], key: str) -> str:
    from workers.events.shapes import event_id

    return str(event_id(f"NOTIFICATION_REQUESTED:student:{key}"))
