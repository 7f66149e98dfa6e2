"""What the console's pages and actions share: the console of a request (its pool,
templates and access rules), the templates' filters, and `render`, which fills a page with
the navigation's counts, who is signed in, the CSRF token and the last action's message."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from workers.console import access
from workers.console.access import Access, visit_of
from workers.database.connections import AsyncConn, fetch_one
from workers.database.sql import q
from workers.ops.story import (
    allocation_line,
    allocation_sessions,
    event_line,
    local,
    payment_line,
    slot,
    zone,
)

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Console:
    """What every request of one console shares (`request.app.state.console`)."""

    pool: AsyncConnectionPool[AsyncConn]
    templates: Jinja2Templates
    outcome_wait: float  # seconds an assignment or a reschedule waits for its outcome
    access: Access
    leave_handover_days: int = 14  # KC_LEAVE_HANDOVER_DAYS, for approve_leave


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


# -- filters --------------------------------------------------------------------------------


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
    console = console_of(request)
    visit = visit_of(request)
    badges = await fetch_one(conn, q("console_badges"), {}) if conn is not None else None
    full = {
        "badges": badges,
        "who": visit.operator,
        "csrf": access.csrf_token(console.access.key, visit.cookie),
        "flash": console.access.flashes.pop(visit.cookie),
        "path": request.url.path,
        **context,
    }
    return console.templates.TemplateResponse(request, name, full, status_code=status)
