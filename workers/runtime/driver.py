"""A pgqueuer Driver on psycopg with a dedicated LISTEN connection.

pgqueuer 1.6's own psycopg driver waits for notifications on the connection its queries use,
with a 1 s timeout under the connection lock: every query can wait up to a second, so an idle
pipeline takes about a second per stage. Here one connection only listens (a notification is
handled the moment it arrives) and the other only runs queries.

What a worker hears is screened first (`unexpected`): any session that may connect can NOTIFY
pgqueuer's channel, so a payload the pipeline does not send is dropped with one WARNING line,
before pgqueuer parses it (pgqueuer logs a malformed one at CRITICAL with a traceback, and
cancels a job named by a cancellation_event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Self

import psycopg
from pgqueuer.core.tm import TaskManager
from pgqueuer.domain.models import AnyEvent
from pgqueuer.ports.driver import NotifyCallback
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import ValidationError

from workers.database.connections import WORKER_ROLE, role_options

log = logging.getLogger(__name__)

# What the pipeline sends on pgqueuer's channel: pgqueuer's trigger says the queue changed, and
# a worker checks its own listener with a health check (answered only for an id it asked
# about). Nothing in the pipeline cancels a job by NOTIFY: a stage's work is one transaction,
# and an operator stops nothing, they replay.
EXPECTED_EVENTS = frozenset({"table_changed_event", "health_check_event"})
_SHOWN = 200  # characters of an unexpected payload that its warning shows


def unexpected(channel: str, payload: str) -> str | None:
    """None for a payload the pipeline sends on `channel`; otherwise why it is not, in a few
    words (the whole payload is pgqueuer's event: well-formed JSON of a type in
    EXPECTED_EVENTS, with every field pgqueuer needs, naming this channel)."""
    try:
        event = AnyEvent.model_validate_json(payload).root
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where + ': ' if where else ''}{first['msg']}".replace("\n", " ")[:_SHOWN]
    if event.type not in EXPECTED_EVENTS:
        return f"a {event.type}: nothing in the pipeline sends one"
    if event.channel != channel:
        return f"it names channel {event.channel[:_SHOWN]!r}"
    return None


def screened(channel: str, payload: str) -> bool:
    """True when the payload may go on to pgqueuer; else says why it is dropped, in one line."""
    reason = unexpected(channel, payload)
    if reason is None:
        return True
    log.warning(
        "ignored a NOTIFY on %s that the pipeline does not send (%s): %r%s",
        channel,
        reason,
        payload[:_SHOWN],
        " ..." if len(payload) > _SHOWN else "",
    )
    return False


class ListeningDriver:
    """Implements pgqueuer's `Driver` protocol (fetch/execute/notify/add_listener)."""

    def __init__(
        self,
        query_conn: psycopg.AsyncConnection[object],
        listen_conn: psycopg.AsyncConnection[object],
    ) -> None:
        for conn in (query_conn, listen_conn):
            if not conn.autocommit:
                raise ValueError("pgqueuer's connections must be in autocommit mode")
        self._query_conn = query_conn
        self._listen_conn = listen_conn
        self._shutdown = asyncio.Event()
        self._tm = TaskManager()
        self._listeners: dict[str, list[NotifyCallback]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._entered = 0

    @classmethod
    async def connect(cls, url: str, name: str = "koding-caravan", role: str = WORKER_ROLE) -> Self:
        """`name` prefixes the connections' application_name; workers are counted by the
        listening connection's name (`koding-caravan-listen`), so tools use another name.
        Both connections act as `role` (a worker's: kc_worker)."""
        options = role_options(url, role)
        query_conn = await psycopg.AsyncConnection.connect(
            url, autocommit=True, application_name=f"{name}-queue", options=options
        )
        listen_conn = await psycopg.AsyncConnection.connect(
            url, autocommit=True, application_name=f"{name}-listen", options=options
        )
        return cls(query_conn, listen_conn)

    async def close(self) -> None:
        for conn in (self._query_conn, self._listen_conn):
            await conn.close()

    @property
    def shutdown(self) -> asyncio.Event:
        return self._shutdown

    @property
    def tm(self) -> TaskManager:
        return self._tm

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        cursor = psycopg.AsyncRawCursor(self._query_conn, row_factory=dict_row)
        await cursor.execute(query, args or None)
        return await cursor.fetchall()

    async def execute(self, query: str, *args: object) -> str:
        cursor = psycopg.AsyncRawCursor(self._query_conn)
        await cursor.execute(query, args or None)
        return cursor.statusmessage or ""

    async def notify(self, channel: str, payload: str) -> None:
        await self.execute("SELECT pg_notify($1, $2)", channel, payload)

    async def add_listener(self, channel: str, callback: NotifyCallback) -> None:
        if channel not in self._listeners:
            await self._listen_conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._listeners[channel] = []
        self._listeners[channel].append(callback)
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="kc-listen")
            self._tm.add(self._watcher)

    async def remove_listener(self, channel: str, callback: NotifyCallback) -> None:
        callbacks = self._listeners.get(channel, [])
        if callback in callbacks:
            callbacks.remove(callback)

    async def _watch(self) -> None:
        # The listen connection does nothing else, so waiting on it blocks nobody.
        while not self._shutdown.is_set():
            async for note in self._listen_conn.notifies(timeout=5.0):
                if not screened(note.channel, note.payload):
                    continue
                for callback in list(self._listeners.get(note.channel, [])):
                    try:
                        callback(note.payload)
                    except Exception:
                        log.exception("NOTIFY callback failed on channel %s", note.channel)

    async def __aenter__(self) -> Self:
        if self._entered == 0:
            self._shutdown.clear()
        self._entered += 1
        return self

    async def __aexit__(self, *_: object) -> None:
        self._entered -= 1
        if self._entered > 0:
            return
        self._shutdown.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._listeners:
            with contextlib.suppress(psycopg.Error):
                await self._listen_conn.execute("UNLISTEN *")
        self._listeners.clear()
