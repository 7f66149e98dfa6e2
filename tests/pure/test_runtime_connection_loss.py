"""Which failures mean "the database went away", and the log filter that keeps a restart to
one line per worker (pure: no database)."""

from __future__ import annotations

import logging
import sys

import psycopg
import psycopg_pool
import pytest

from workers.runtime.connection_loss import ConnectionLossFilter, connection_lost


def _raised_from(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as exc:
            raise outer from exc
    except Exception as caught:
        return caught


@pytest.mark.parametrize(
    ("exc", "lost"),
    [
        (psycopg.OperationalError("consuming input failed: server closed the connection"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.errors.CannotConnectNow("the database system is starting up"), True),
        (ConnectionResetError(), True),
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), False),
        (psycopg.errors.LockNotAvailable("could not obtain lock"), False),
        (psycopg_pool.PoolTimeout("couldn't get a connection after 30 sec"), False),
        (psycopg.errors.DeadlockDetected("deadlock detected"), False),
        (ValueError("bad data"), False),
        (_raised_from(RuntimeError("retry"), psycopg.errors.AdminShutdown("x")), True),
        (_raised_from(RuntimeError("retry"), ValueError("bad data")), False),
        (ExceptionGroup("tasks", [ValueError("a"), psycopg.OperationalError("gone")]), True),
    ],
)
def test_connection_lost(exc: Exception, lost: bool) -> None:
    assert connection_lost(exc) is lost


def _record(name: str, message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, exc_info)


def test_the_filter_drops_and_counts_only_records_about_the_lost_connection() -> None:
    quiet = ConnectionLossFilter()
    flush = _record("pgqueuer", "Shutdown flush failed, 20 items remaining")
    assert quiet.filter(flush) is True  # no loss seen yet: a real problem, shown
    assert (
        quiet.filter(_record("workers.runtime.runner", "allocation x failed", ValueError())) is True
    )
    shutdown = psycopg.errors.AdminShutdown("terminating connection")
    assert quiet.filter(_record("pgqueuer", "job 1 failed", shutdown)) is False
    assert quiet.lost
    assert quiet.filter(flush) is False
    assert quiet.filter(_record("psycopg.pool", "discarding closed connection: <conn>")) is False
    pool_full = "error connecting in 'stages': FATAL: sorry, too many clients already"
    assert quiet.filter(_record("psycopg.pool", pool_full)) is True
    timeout = psycopg.errors.QueryCanceled("statement timeout")
    assert quiet.filter(_record("workers.runtime.runner", "sessions y failed", timeout)) is True
    assert quiet.suppressed == 3


def test_records_keep_their_traceback_when_the_connection_is_fine() -> None:
    try:
        raise psycopg.errors.UniqueViolation("duplicate key")
    except psycopg.Error:
        record = _record("pgqueuer", "Exception while processing", sys.exc_info()[1])
    assert ConnectionLossFilter().filter(record) is True
