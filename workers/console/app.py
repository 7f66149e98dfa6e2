"""The console's application: its routes, the signed session, the security headers, the
templates and their filters, and the pages shown for a refusal or while the database is away."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.database.connections import AsyncConn, fetch_one, make_operator_pool
from workers.database.sql import q
from workers.errors import RequestRefused
from workers.ops.story import (
    allocation_line,
    allocation_sessions,
    event_line,
    local,
    payment_line,
    slot,
    zone,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "kc_console"
SESSION_HOURS = 12

# No script at all; styles from the console's own file; forms post to the console only.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


@dataclass(frozen=True)
class Console:
    """What every request of one console shares (`request.app.state.console`)."""

    pool: AsyncConnectionPool[AsyncConn]
    token: str | None  # None: read-only
    templates: Jinja2Templates
    outcome_wait: float  # seconds an assignment or a reschedule waits for its outcome


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def session_secret(token: str | None) -> str:
    """The key that signs the session cookie. From the token, so that a new token signs
    every person out; without a token (read-only) one per process."""
    if token is None:
        return secrets.token_hex(32)
    return hmac.new(token.encode(), b"koding-caravan console session", hashlib.sha256).hexdigest()


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- rendering --------------------------------------------------------------------------------


def local_short(value: datetime | None, zone_name: str | None = None) -> str:
    if value is None:
        return ""
    return value.astimezone(zone(zone_name)).strftime("%d %b %H:%M %Z")


def duration(value: timedelta | float | None) -> str:
    """A wait as a person says it: '45 s', '12 min', '3 h 20 min', '2 d 4 h'."""
    if value is None:
        return ""
    seconds = int(value.total_seconds() if isinstance(value, timedelta) else value)
    seconds = max(seconds, 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def since(value: datetime | None) -> str:
    return "" if value is None else duration(datetime.now(UTC) - value)


def milliseconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value / 1000:.1f} s" if value >= 10_000 else f"{value:.1f} ms"


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    filters = templates.env.filters
    filters["local"] = local
    filters["local_short"] = local_short
    filters["duration"] = duration
    filters["since"] = since
    filters["ms"] = milliseconds
    filters["slot"] = slot
    filters["payment_line"] = payment_line
    filters["allocation_line"] = allocation_line
    filters["allocation_sessions"] = allocation_sessions
    filters["event_line"] = event_line
    return templates


async def render(
    request: Request,
    conn: AsyncConn | None,
    name: str,
    context: Mapping[str, Any],
    status: int = 200,
) -> Response:
    """A page: the template, the navigation's counts (when a connection is at hand), who is
    signed in, the CSRF token for its forms and the message left by the last action."""
    from workers.console.actions import csrf_token, signed_in_name

    console = console_of(request)
    badges = await fetch_one(conn, q("console_badges"), {}) if conn is not None else None
    flash = request.session.pop("flash", None) if "session" in request.scope else None
    full = {
        "badges": badges,
        "read_only": console.token is None,
        "who": signed_in_name(request),
        "csrf": csrf_token(request),
        "flash": flash,
        "path": request.url.path,
        **context,
    }
    return console.templates.TemplateResponse(request, name, full, status_code=status)


# -- errors -----------------------------------------------------------------------------------


async def refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestRefused)
    return await render(
        request,
        None,
        "message.html",
        {"title": "Refused", "message": str(exc), "unchanged": True},
        exc.status,
    )


async def database_unavailable(request: Request, exc: Exception) -> Response:
    """The server is away (restarting, unreachable): say so; the next request tries again
    (the pool replaces dropped connections), and the page reloads itself."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    log.warning("console: database unavailable: %s", reason)
    return await render(
        request, None, "unavailable.html", {"title": "Database unavailable", "reason": reason}, 503
    )


async def not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    message = "There is no such page." if status == 404 else str(getattr(exc, "detail", exc))
    return await render(
        request, None, "message.html", {"title": "Not here", "message": message}, status
    )


# -- the application --------------------------------------------------------------------------


def create_app(
    url: str,
    token: str | None,
    *,
    allowed_hosts: list[str] | None = None,
    outcome_wait: float = 10.0,
    pool_timeout: float = 5.0,
) -> Starlette:
    """The console on the database at `url`. `token`: KC_CONSOLE_TOKEN (None: read-only).
    `allowed_hosts`: the Host headers accepted (loopback names when it listens on loopback,
    so that a web page elsewhere cannot reach it through DNS rebinding)."""
    from workers.console import actions, pages

    pool = make_operator_pool(url, timeout=pool_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Not waiting: a console started while the database is away serves its
        # "unavailable" page and connects once the server answers.
        await pool.open(wait=False)
        try:
            yield
        finally:
            await pool.close()

    routes = [
        Route("/", pages.overview),
        Route("/waiting", pages.waiting),
        Route("/failures", pages.failures),
        Route("/search", pages.search),
        Route("/trace/{ref}", pages.trace),
        Route("/signin", actions.signin_form, methods=["GET"]),
        Route("/signin", actions.signin, methods=["POST"]),
        Route("/signout", actions.signout, methods=["POST"]),
        Route("/actions/replay", actions.replay, methods=["POST"]),
        Route("/actions/replay-failed", actions.replay_failed, methods=["POST"]),
        Route("/actions/assign", actions.assign, methods=["POST"]),
        Route("/actions/reschedule", actions.reschedule, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"]),
        Middleware(
            SessionMiddleware,
            secret_key=session_secret(token),
            session_cookie=SESSION_COOKIE,
            max_age=SESSION_HOURS * 3600,
            same_site="strict",
        ),
    ]
    handlers = {
        RequestRefused: refused,
        psycopg.OperationalError: database_unavailable,
        PoolTimeout: database_unavailable,
        HTTPException: not_found,
    }
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.state.console = Console(pool, token, make_templates(), outcome_wait)
    return app
