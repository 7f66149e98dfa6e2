"""A lost database connection: how the worker tells one (`connection_lost`), which errors
make it reconnect instead of exiting (`RECONNECT`), and the filter that turns the flood of
per-job records about one loss into the one line `serve` writes (`ConnectionLossFilter`)."""

from __future__ import annotations

import logging

import psycopg
import psycopg_pool

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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
