"""The relay: business events from the outbox to the app's Redis, in order, at least once.

`python -m workers relay` (and `make run-workers` when REDIS_URL is set, which supervises it
like a worker). It reads the events after its cursor (`consumer_events`, consumer
`redis-relay`, registered at the end of the feed on its first run), publishes each one's
JSON on the Pub/Sub channel `business-events` (what the app's gateway subscribes to) and
appends it to the stream `business-events:stream` (entry id `<position>-0`, trimmed to about
KC_EVENTS_STREAM_MAXLEN entries), and only once Redis has accepted the whole batch moves its
cursor (`advance_event_consumer`). A crash between the two publishes the batch again: a
subscriber may see an event twice (its `eventId` tells), the stream refuses the second copy
(its id is not above the last one). It waits on LISTEN kc_business_events, and polls every
KC_IDLE_POLL_SECONDS.

Redis away or restarting: the relay says so in one WARNING line, keeps the events in the
outbox, retries with backoff (0.1 s doubling to 2 s) and catches up when Redis answers. The
database away: one WARNING line, then it reconnects with backoff. Two relays for one
consumer: the second stands by (a session advisory lock) until the first is gone.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import psycopg
import redis

from workers.database.connections import WORKER_ROLE, SyncConn, connect_sync
from workers.database.sql import q
from workers.errors import ConfigurationError
from workers.settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "business-events"  # the app's gateway: services/api-gateway/src/websocket/eventServer.ts
STREAM = "business-events:stream"
CONSUMER = "redis-relay"
APPLICATION_NAME = "koding-caravan-relay"

# Connection problems a relay outlives by waiting: the database restarting, a network cut.
DATABASE_LOST: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    ConfigurationError,  # connect_sync's "cannot connect"
    ConnectionError,
)
# What Redis says when the stream already holds the entry (a batch published again).
_ALREADY_IN_STREAM = "equal or smaller than the target stream top item"


@dataclass(frozen=True)
class Event:
    position: int
    event_id: UUID
    type: str
    purchase_id: UUID | None
    json: str


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + (parts.hostname or "") + _port(parts.port)))


def _port(port: int | None) -> str:
    return f":{port}" if port is not None else ""


def connect_redis(url: str) -> redis.Redis:
    # Short socket timeouts: a Redis that stops answering is noticed within seconds, and the
    # batch is published again once it answers (at least once).
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)


class Relay:
    """One relay for one consumer. `run()` until `stop` is set."""

    def __init__(
        self,
        db_url: str,
        redis_url: str,
        settings: Settings,
        *,
        consumer: str = CONSUMER,
        stop: threading.Event | None = None,
    ) -> None:
        self.db_url = db_url
        self.redis_url = redis_url
        self.settings = settings
        self.consumer = consumer
        self.stop = stop or threading.Event()
        self.redis = connect_redis(redis_url)
        self.published = 0  # events Redis accepted since start (duplicates included)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        delay = 0.2
        lost_at: float | None = None
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                with connect_sync(
                    self.db_url, timeout=5, role=WORKER_ROLE, application_name=APPLICATION_NAME
                ) as conn:
                    if lost_at is not None:
                        log.warning(
                            "relay: database connection back after %.1fs",
                            time.monotonic() - lost_at,
                        )
                        lost_at = None
                    self._relay(conn)
                return
            except DATABASE_LOST as exc:
                if self.stop.is_set():
                    return
                if time.monotonic() - started > 60:
                    delay = 0.2
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.warning(
                        "relay: database connection lost (%s); reconnecting with backoff "
                        "(events wait in the outbox)",
                        _first_line(exc),
                    )
                self.stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _relay(self, conn: SyncConn) -> None:
        conn.execute("LISTEN kc_business_events")
        if not self._hold_consumer(conn):
            return
        row = conn.execute(q("register_relay"), {"consumer": self.consumer}).fetchone()
        position = int(row["position"]) if row else 0
        log.info(
            "relay %s: publishing on %s (channel %s, stream %s) from position %d",
            self.consumer,
            redacted(self.redis_url),
            CHANNEL,
            STREAM,
            position,
        )
        while not self.stop.is_set():
            events = read_events(conn, self.consumer, self.settings.relay_batch)
            if not events:
                self._wait(conn)
                continue
            if not self._publish_until_accepted(events):
                return  # stopping: the cursor stays, the batch is published next time
            row = conn.execute(
                q("advance_relay"), {"consumer": self.consumer, "position": events[-1].position}
            ).fetchone()
            position = int(row["position"]) if row else position

    def _hold_consumer(self, conn: SyncConn) -> bool:
        """One relay per consumer: the others stand by until it is gone (its connection
        closes, so does its lock). False when asked to stop while standing by."""
        told = False
        while not self.stop.is_set():
            row = conn.execute(q("hold_relay_consumer"), {"consumer": self.consumer}).fetchone()
            if row and row["held"]:
                return True
            if not told:
                log.info(
                    "relay %s: another relay publishes for this consumer; standing by",
                    self.consumer,
                )
                told = True
            self.stop.wait(1.0)
        return False

    def _wait(self, conn: SyncConn) -> None:
        """Until a notification (events committed), the idle poll, or a stop request."""
        deadline = time.monotonic() + self.settings.idle_poll_seconds
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for _ in conn.notifies(timeout=min(left, 0.5), stop_after=1):
                return

    # -- Redis -----------------------------------------------------------------------------

    def _publish_until_accepted(self, events: list[Event]) -> bool:
        """Publish the batch, waiting for Redis as long as it takes; False if asked to stop."""
        delay = 0.1
        down_at: float | None = None
        while not self.stop.is_set():
            try:
                publish(self.redis, events, self.settings.events_stream_maxlen)
            except redis.RedisError as exc:
                if down_at is None:
                    down_at = time.monotonic()
                    log.warning(
                        "relay: Redis at %s is unavailable (%s); events wait in the outbox "
                        "from position %d and are published when it answers",
                        redacted(self.redis_url),
                        _first_line(exc),
                        events[0].position,
                    )
                self.stop.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            if down_at is not None:
                log.info(
                    "relay: Redis answers again after %.1fs; catching up from position %d",
                    time.monotonic() - down_at,
                    events[0].position,
                )
            self.published += len(events)
            return True
        return False


def register(db_url: str, consumer: str = CONSUMER) -> int:
    """The relay's cursor, created at the end of the feed when it has none. `make run-workers`
    calls this before it starts any worker, so that no event they write can come before the
    relay's starting point (the relay process itself may take a second to start)."""
    with connect_sync(
        db_url, timeout=10, role=WORKER_ROLE, application_name=APPLICATION_NAME + "-setup"
    ) as conn:
        row = conn.execute(q("register_relay"), {"consumer": consumer}).fetchone()
    return int(row["position"]) if row else 0


def read_events(conn: SyncConn, consumer: str, limit: int) -> list[Event]:
    rows = conn.execute(q("relay_events"), {"consumer": consumer, "limit": limit}).fetchall()
    return [
        Event(int(r["pos"]), r["event_id"], r["type"], r["purchase_id"], r["json"]) for r in rows
    ]


def publish(client: redis.Redis, events: list[Event], maxlen: int) -> None:
    """Every event on the channel and in the stream, in order, in one round trip. Raises
    RedisError unless Redis accepted all of them (an entry the stream holds already counts)."""
    pipe = client.pipeline(transaction=False)
    for event in events:
        pipe.publish(CHANNEL, event.json)
        fields: dict[Any, Any] = {
            "eventId": str(event.event_id),
            "type": event.type,
            "purchaseId": "" if event.purchase_id is None else str(event.purchase_id),
            "event": event.json,
        }
        pipe.xadd(STREAM, fields, id=f"{event.position}-0", maxlen=maxlen, approximate=True)
    for result in pipe.execute(raise_on_error=False):
        if isinstance(result, redis.ResponseError) and _ALREADY_IN_STREAM in str(result):
            continue
        if isinstance(result, Exception):
            raise result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def serve(db_url: str, redis_url: str, settings: Settings) -> int:
    """The relay process: until SIGTERM or SIGINT (the batch in hand is finished or left)."""
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    relay = Relay(db_url, redis_url, settings, stop=stop)
    relay.run()
    log.info("relay stopped (%d events published)", relay.published)
    return 0
