"""The console's application: its routes, the gate every request passes (who is asking;
beyond loopback, sign-in first), the security headers, the templates and their filters, and
the pages shown for a refusal or while the database is away."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from ipaddress import ip_address
from urllib.parse import quote

import psycopg
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.console import access, actions, pages
from workers.console.access import Access, BoundedBody, Throttle, Visit
from workers.console.rendering import HERE, Console, console_of, make_templates, render
from workers.database.connections import make_operator_pool
from workers.errors import RequestRefused

log = logging.getLogger(__name__)

# No script at all; styles from the console's own file; forms post to the console only.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


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


# -- errors -----------------------------------------------------------------------------------


async def refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestRefused)
    context = {"title": "Refused", "message": str(exc), "unchanged": True}
    response = await render(request, None, "message.html", context, exc.status)
    if exc.retry_after is not None:
        response.headers["retry-after"] = str(exc.retry_after)
    return response


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


# -- the gate ---------------------------------------------------------------------------------


def from_loopback(request: Request) -> bool:
    """The client is on this machine. Behind a reverse proxy on this machine the client is
    the address the proxy forwards (uvicorn trusts X-Forwarded-For from loopback), so a
    console published through a proxy is not read as if from here."""
    try:
        return request.client is not None and ip_address(request.client.host).is_loopback
    except ValueError:
        return False


class Gate:
    """Every request but the style sheet's: who is asking (the cookie's session, looked up in
    the database; a first visit gets a cookie), and nothing but the sign-in page for someone
    not signed in, unless the console listens on loopback and the client is on this machine.
    A POST to /signin is not looked up: it makes a new session, and its throttle comes before
    any work."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/static/"):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        console = console_of(request)
        cookie = request.cookies.get(access.COOKIE)
        if cookie is not None and access.well_formed(cookie):
            visit = Visit(cookie)
        else:
            visit = Visit(access.new_id(), send_cookie=True)
        request.state.visit = visit

        async def send_cookie(message: Message) -> None:
            if message["type"] == "http.response.start" and visit.send_cookie:
                secure = scope.get("scheme") == "https"
                message["headers"] = [*message.get("headers", []), visit.set_cookie_header(secure)]
            await send(message)

        try:
            response = await self.check(request, console, visit)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            response = await database_unavailable(request, exc)
        if response is not None:
            await response(scope, receive, send_cookie)
            return
        await self.app(scope, receive, send_cookie)

    async def check(self, request: Request, console: Console, visit: Visit) -> Response | None:
        """None: let the request through; else the answer instead."""
        path = request.url.path
        if not visit.send_cookie and not (path == "/signin" and request.method == "POST"):
            found = await access.session_of(console.pool, visit.cookie)
            if found is not None:
                visit.operator, visit.expires_at = found["operator"], found["expires_at"]
        if visit.operator is not None:
            return None
        if not console.access.read_needs_sign_in and from_loopback(request):
            return None
        if path == "/signin":
            return None
        if request.method in ("GET", "HEAD"):
            target = path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/signin?next={quote(target, safe='')}", status_code=303)
        return await refused(
            request,
            RequestRefused(403, "Sign in with your operator token first: nothing was done."),
        )


# -- the application --------------------------------------------------------------------------


def create_app(
    url: str,
    *,
    read_needs_sign_in: bool,
    allowed_hosts: list[str] | None = None,
    outcome_wait: float = 10.0,
    pool_timeout: float = 5.0,
    throttle: Throttle | None = None,
    leave_handover_days: int = 14,
) -> Starlette:
    """The console on the database at `url`. `read_needs_sign_in`: every page needs a
    signed-in operator (beyond loopback), not only the actions. `allowed_hosts`: the Host
    headers accepted (loopback names when it listens on loopback, so that a web page
    elsewhere cannot reach it through DNS rebinding). `throttle`: the sign-in throttle
    (tests give one with their own clock)."""
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
        Route("/leaves", pages.leaves),
        Route("/signin", actions.signin_form, methods=["GET"]),
        Route("/signin", actions.signin, methods=["POST"]),
        Route("/signout", actions.signout, methods=["POST"]),
        Route("/actions/replay", actions.replay, methods=["POST"]),
        Route("/actions/replay-failed", actions.replay_failed, methods=["POST"]),
        Route("/actions/assign", actions.assign, methods=["POST"]),
        Route("/actions/reschedule", actions.reschedule, methods=["POST"]),
        Route("/actions/leave-request", actions.leave_request, methods=["POST"]),
        Route("/actions/leave-approve", actions.leave_approve, methods=["POST"]),
        Route("/actions/leave-cancel", actions.leave_cancel, methods=["POST"]),
        Route("/actions/substitute", actions.substitute, methods=["POST"]),
        Route("/actions/move", actions.decide_move, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"]),
        Middleware(BoundedBody),
        Middleware(Gate),
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
    rules = Access(read_needs_sign_in, throttle=throttle or Throttle())
    app.state.console = Console(pool, make_templates(), outcome_wait, rules, leave_handover_days)
    return app
