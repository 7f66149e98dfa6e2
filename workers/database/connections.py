"""psycopg connections and row access. A stage gets its connection from the stages' pool,
inside a transaction (`transaction`); a command opens one autocommit connection
(`connect_sync`); the console has a pool of autocommit connections that act as kc_operator
(`make_operator_pool`). The queue's own connections are in `driver.py`.

Each part of the pipeline acts as its own role whatever login it connects with (a superuser
in development, the owner, a login made for it): the workers' connections as kc_worker, the
operator commands' as kc_operator (`role_options`). docs/security.md says what each
role may do."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool

from workers.errors import ConfigurationError, DatabaseRefusalError

log = logging.getLogger(__name__)

T = TypeVar("T")

# A stage's connection: async, from the pool, inside the stage's transaction.
AsyncConn = psycopg.AsyncConnection[DictRow]
# A command's connection (status, trace, doctor, assign ...): sync and autocommit.
SyncConn = psycopg.Connection[DictRow]
Params = Mapping[str, Any]


# The project's roles (migration 0005). Logins are made members of one of them.
OWNER_ROLE = "kc_owner"
WORKER_ROLE = "kc_worker"
OPERATOR_ROLE = "kc_operator"


def role_options(url: str, role: str | None, *settings: str) -> str:
    """libpq `options` for a connection to `url` that acts as `role` from its first statement
    (the server sets the role while it starts the session, so RESET ROLE returns to it, and a
    login that is not a member is refused there: "permission denied to set role"), with the
    URL's own options and `settings` ("-c name=value")."""
    given = str(conninfo_to_dict(url).get("options") or "")
    return " ".join(part for part in (given, *settings, f"-c role={role}" if role else "") if part)


def refused_role(exc: BaseException, role: str) -> bool:
    """True when a connection failed because its login may not act as `role`."""
    return f'permission denied to set role "{role}"' in str(exc)


def role_refusal(url: str, role: str) -> ConfigurationError:
    user = conninfo_to_dict(url).get("user") or "(the login of DATABASE_URL)"
    return ConfigurationError(
        f"the login {user} may not act as {role}, the role this part of the pipeline runs "
        f"as: GRANT {role} TO {user}; or a DATABASE_URL whose login is a member of {role} "
        "(docs/security.md)"
    )


def connect_sync(
    url: str,
    *,
    timeout: int | None = None,
    role: str | None = None,
    application_name: str | None = None,
) -> SyncConn:
    """A command's connection, acting as `role` when one is named; ConfigurationError (naming
    psycopg's reason, kept as its cause) when the database does not answer within `timeout`
    seconds or the login may not act as `role`."""
    options: dict[str, Any] = {} if timeout is None else {"connect_timeout": timeout}
    if role is not None:
        options["options"] = role_options(url, role)
    if application_name is not None:
        options["application_name"] = application_name
    try:
        return psycopg.connect(url, autocommit=True, row_factory=dict_row, **options)
    except psycopg.OperationalError as exc:
        if role is not None and refused_role(exc, role):
            raise role_refusal(url, role) from exc
        raise ConfigurationError(f"cannot connect to the database: {exc}".strip()) from exc


def check_role(url: str, role: str) -> None:
    """ConfigurationError when the login of `url` may not act as `role`. A database that does
    not answer is not this check's business: the worker waits for it and reconnects."""
    try:
        connect_sync(url, timeout=10, role=role).close()
    except ConfigurationError as exc:
        if exc.__cause__ is not None and refused_role(exc.__cause__, role):
            raise


def make_pool(
    url: str, size: int, statement_timeout: float = 60.0
) -> AsyncConnectionPool[AsyncConn]:
    """The stages' connections: they act as kc_worker."""
    timeout = f"-c statement_timeout={int(statement_timeout * 1000)}"
    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=size,
        open=False,
        name="stages",
        kwargs={
            "row_factory": dict_row,
            "application_name": "koding-caravan-stage",
            "options": role_options(url, WORKER_ROLE, timeout),
        },
        connection_class=psycopg.AsyncConnection[DictRow],
        # After the server restarts or terminates backends, hand out live connections only.
        check=AsyncConnectionPool.check_connection,
    )


async def act_as_operator(conn: AsyncConn) -> None:
    """SET ROLE kc_operator: what the connection may do is what that role may do, even when
    the login is the owner or a superuser (development, the embedded server)."""
    await conn.execute("SET ROLE kc_operator")


def make_operator_pool(
    url: str, size: int = 4, timeout: float = 5.0
) -> AsyncConnectionPool[AsyncConn]:
    """The console's connections: autocommit (each action is one call of an operator
    function), as kc_operator. A connection the server dropped (a restart, a terminated
    backend) is replaced before it is handed out; while the server is away, a request waits
    `timeout` seconds for one and gets PoolTimeout."""
    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=size,
        open=False,
        name="console",
        timeout=timeout,
        # A connection attempt that keeps failing is given up after this long; the next
        # request starts a new one, so the pool comes back whenever the server does.
        reconnect_timeout=30.0,
        kwargs={
            "row_factory": dict_row,
            "autocommit": True,
            "application_name": "koding-caravan-console",
            "connect_timeout": max(1, int(timeout)),
            "options": "-c statement_timeout=15000",
        },
        connection_class=psycopg.AsyncConnection[DictRow],
        configure=act_as_operator,
        check=AsyncConnectionPool.check_connection,
    )


@contextlib.asynccontextmanager
async def transaction(pool: AsyncConnectionPool[AsyncConn]) -> AsyncIterator[AsyncConn]:
    """A connection inside a transaction: committed on exit, rolled back on error."""
    async with pool.connection() as conn, conn.transaction():
        yield conn


@contextlib.asynccontextmanager
async def savepoint_or_refusal(conn: AsyncConn) -> AsyncIterator[None]:
    """A savepoint: when the database refuses the writes inside it (a constraint, a trigger's
    check), they are rolled back, the transaction goes on and DatabaseRefusalError says why."""
    try:
        async with conn.transaction():
            yield
    except psycopg.errors.IntegrityError as exc:
        raise DatabaseRefusalError(exc.diag.message_primary or str(exc)) from exc


async def kept_if(
    conn: AsyncConn, work: Callable[[], Awaitable[T]], keep: Callable[[T], bool]
) -> T:
    """`work` in a savepoint, kept when `keep` says so of its result and otherwise rolled
    back: its writes are undone and the locks it took are released (transaction-scoped
    advisory locks too), while the transaction goes on."""
    async with conn.transaction():
        result = await work()
        if not keep(result):
            raise psycopg.Rollback()
    return result


async def fetch_one(conn: AsyncConn, query: LiteralString, params: Params) -> DictRow | None:
    cursor = await conn.execute(query, params)
    return await cursor.fetchone()


async def fetch_all(conn: AsyncConn, query: LiteralString, params: Params) -> list[DictRow]:
    cursor = await conn.execute(query, params)
    return await cursor.fetchall()


async def fetch_tuples(
    conn: AsyncConn, query: LiteralString, params: Params
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and plain tuples: for queries returning many rows, where building a
    dict per row costs more than the row's work."""
    cursor = conn.cursor(row_factory=tuple_row)
    await cursor.execute(query, params)
    columns = [column.name for column in cursor.description or ()]
    return columns, await cursor.fetchall()
