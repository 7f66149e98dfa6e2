"""Who may use the console, and how a request proves it: the cookie, the sessions the database
keeps, the CSRF token of every form, the sign-in throttle and the bound on request bodies.

The cookie (`kc_console`) carries one opaque random id and nothing else. When a person signs
in with their operator token, the id becomes a session the database knows (console_sign_in):
it names the operator, ends 12 hours after sign-in whatever happens in between, and ends at
once on sign-out or when the operator is revoked. Each request looks its id up
(console_session); the operator functions check it again themselves and record its operator
as the actor, so the console never says who someone is. Before sign-in the id is only a
visitor's, for the CSRF token of the sign-in form.

The CSRF token is an HMAC of the cookie's id under a key made when the console starts and
held in its memory only: it keys nothing else (sign-in lives in the database, so a restart
signs nobody out, and costs a form left open across it one reload), it is never written
anywhere, so there is nothing to leak from a disk or a backup, and it depends on no token,
so no cookie or page says anything about one."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.database.connections import AsyncConn, fetch_one
from workers.database.sql import q
from workers.errors import RequestRefused

COOKIE = "kc_console"
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32): 256 random bits
BODY_LIMIT = 16 * 1024  # the console's largest form (a reschedule, a note) is a few hundred bytes
FORM = "application/x-www-form-urlencoded"


def new_id() -> str:
    return secrets.token_urlsafe(32)


def well_formed(value: str | None) -> bool:
    return value is not None and ID_PATTERN.fullmatch(value) is not None


@dataclass
class Visit:
    """Who is asking (`request.state.visit`): the cookie's id, the operator it is signed in
    as (None: nobody), and whether the response must send the cookie (new or changed)."""

    cookie: str
    operator: str | None = None
    expires_at: datetime | None = None
    send_cookie: bool = False

    def become(self, cookie: str, operator: str | None, expires_at: datetime | None) -> None:
        self.cookie, self.operator, self.expires_at = cookie, operator, expires_at
        self.send_cookie = True

    def set_cookie_header(self, secure: bool) -> tuple[bytes, bytes]:
        """HttpOnly, SameSite=Strict, Secure over HTTPS; a signed-in session's cookie ends
        when the session does (Max-Age), a visitor's with the browser."""
        parts = [f"{COOKIE}={self.cookie}", "Path=/", "HttpOnly", "SameSite=Strict"]
        if self.expires_at is not None:
            left = self.expires_at.timestamp() - time.time()
            parts.append(f"Max-Age={max(0, int(left))}")
        if secure:
            parts.append("Secure")
        return b"set-cookie", "; ".join(parts).encode()


def visit_of(request: Request) -> Visit:
    """The request's visit; a first-time visitor's when the gate did not run (a page
    rendered for an error raised before it)."""
    visit = getattr(request.state, "visit", None)
    if not isinstance(visit, Visit):
        visit = Visit(new_id(), send_cookie=True)
        request.state.visit = visit
    return visit


# -- CSRF ------------------------------------------------------------------------------------


def csrf_token(key: bytes, cookie: str) -> str:
    digest = hmac.new(key, b"csrf:" + cookie.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def csrf_matches(key: bytes, cookie: str, sent: object) -> bool:
    return isinstance(sent, str) and hmac.compare_digest(
        sent.encode(), csrf_token(key, cookie).encode()
    )


# -- the sign-in throttle ----------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """`burst` attempts at once, then one more every `every` seconds."""

    burst: int
    every: float


@dataclass
class Bucket:
    tokens: float
    at: float


@dataclass
class Throttle:
    """Sign-in attempts per client address and overall, as token buckets, in this process.

    Tokens are 256 random bits: no rate lets anyone guess one, so the throttle is not what
    keeps them secret. It keeps a flood of sign-in attempts from costing the database work:
    an attempt over the limit is refused before its body is read or the database is asked.
    In-process is enough for that: the console is one process, and a person with a database
    login of their own could call console_sign_in directly anyway, with no better odds. The
    table of clients is bounded (the least recently seen are forgotten first; the overall
    bucket still holds)."""

    per_client: Rate = Rate(burst=5, every=10.0)
    overall: Rate = Rate(burst=30, every=1.0)
    clock: Callable[[], float] = time.monotonic
    max_clients: int = 10_000
    clients: OrderedDict[str, Bucket] = field(default_factory=OrderedDict)
    everyone: Bucket | None = None

    def _refill(self, bucket: Bucket, rate: Rate, now: float) -> None:
        bucket.tokens = min(rate.burst, bucket.tokens + (now - bucket.at) / rate.every)
        bucket.at = now

    def attempt(self, client: str) -> tuple[str, int] | None:
        """None: go ahead (one attempt is counted); else whose limit is reached ('client'
        or 'overall') and the seconds until the next attempt may be made."""
        now = self.clock()
        if self.everyone is None:
            self.everyone = Bucket(self.overall.burst, now)
        bucket = self.clients.pop(client, None) or Bucket(self.per_client.burst, now)
        self.clients[client] = bucket  # most recently seen last
        while len(self.clients) > self.max_clients:
            self.clients.popitem(last=False)
        self._refill(bucket, self.per_client, now)
        self._refill(self.everyone, self.overall, now)
        if bucket.tokens < 1:
            return "client", math.ceil((1 - bucket.tokens) * self.per_client.every)
        if self.everyone.tokens < 1:
            return "overall", math.ceil((1 - self.everyone.tokens) * self.overall.every)
        bucket.tokens -= 1
        self.everyone.tokens -= 1
        return None


# -- messages shown once ----------------------------------------------------------------------


@dataclass
class Flashes:
    """The message an action leaves for the next page, by cookie id, in this process (a
    restart loses at most a message); the oldest go first beyond `limit`."""

    limit: int = 10_000
    messages: OrderedDict[str, dict[str, str]] = field(default_factory=OrderedDict)

    def put(self, cookie: str, kind: str, text: str) -> None:
        self.messages.pop(cookie, None)
        self.messages[cookie] = {"kind": kind, "text": text}
        while len(self.messages) > self.limit:
            self.messages.popitem(last=False)

    def pop(self, cookie: str) -> dict[str, str] | None:
        return self.messages.pop(cookie, None)


@dataclass(frozen=True)
class Access:
    """What the console's access rules need (`Console.access`)."""

    read_needs_sign_in: bool  # beyond loopback: every page, reading included
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    throttle: Throttle = field(default_factory=Throttle)
    flashes: Flashes = field(default_factory=Flashes)
    body_limit: int = BODY_LIMIT


# -- request bodies ---------------------------------------------------------------------------


class BodyTooLarge(RequestRefused):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"The request is larger than the console accepts ({limit // 1024} KiB): "
            "nothing was read or done. The console's forms are far smaller; submit the "
            "page's own form.",
        )


class BoundedBody:
    """Refuses a request body the console's forms never need, before anything reads it: a
    declared length over the limit (413) or a kind of body other than a form (415) at once;
    a body sent without a length is counted as it arrives and refused once it passes the
    limit (BodyTooLarge, raised to whoever reads it)."""

    def __init__(self, app: ASGIApp, limit: int = BODY_LIMIT) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "")
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        refusal = None
        if length and not length.isdigit():
            refusal = 400, "refused: Content-Length is not a number"
        elif length and int(length) > self.limit:
            refusal = 413, f"refused: a request body is at most {self.limit // 1024} KiB here"
        elif kind and kind != FORM:
            refusal = 415, f"refused: the console accepts forms only ({FORM})"
        if refusal is not None:
            status, text = refusal
            await PlainTextResponse(text, status_code=status)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


# -- the database's sessions ------------------------------------------------------------------


async def session_of(pool: AsyncConnectionPool[AsyncConn], cookie: str) -> dict[str, Any] | None:
    """The operator and expiry of a live session, or None."""
    async with pool.connection() as conn:
        row = await fetch_one(conn, q("console_session"), {"session": cookie})
    return dict(row) if row is not None else None


async def sign_in(
    pool: AsyncConnectionPool[AsyncConn], token: str, session: str, client: str | None
) -> dict[str, Any] | None:
    """A new session for the operator whose token this is; None: no live operator's."""
    async with pool.connection() as conn:
        row = await fetch_one(
            conn, q("console_sign_in"), {"token": token, "session": session, "client": client}
        )
    return dict(row) if row is not None else None


async def sign_out(pool: AsyncConnectionPool[AsyncConn], session: str) -> None:
    async with pool.connection() as conn:
        await fetch_one(conn, q("console_sign_out"), {"session": session})


async def operator_count(pool: AsyncConnectionPool[AsyncConn]) -> int:
    async with pool.connection() as conn:
        row = await fetch_one(conn, q("console_operator_count"), {})
    return int(row["operators"]) if row is not None else 0
