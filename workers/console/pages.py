"""The console's pages, each a few named queries (sql/queries/console.sql) read as
kc_operator: the overview, the waiting purchases, the failures, the search and the trace."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from psycopg.rows import DictRow
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from workers.console.access import visit_of
from workers.console.charts import StagePoint, stage_chart
from workers.console.rendering import console_of, render
from workers.database.connections import fetch_all, fetch_one
from workers.database.sql import q
from workers.errors import RequestRefused
from workers.ops.story import Row, Story, load_async

FUNNEL_WINDOW = timedelta(hours=24)
CHART_SPAN = timedelta(hours=12)
CHART_BUCKET = timedelta(minutes=30)
LIST_LIMIT = 200
SEARCH_LIMIT = 50


async def overview(request: Request) -> Response:
    async with console_of(request).pool.connection() as conn:
        funnel = await fetch_one(conn, q("console_funnel"), {"window": FUNNEL_WINDOW})
        stages = await fetch_all(conn, q("stage_overview"), {})
        points = await fetch_all(
            conn, q("console_stage_chart"), {"span": CHART_SPAN, "bucket": CHART_BUCKET}
        )
        chart = stage_chart(
            [StagePoint(**p) for p in points], datetime.now(UTC), CHART_SPAN, CHART_BUCKET
        )
        event_lag = await fetch_all(conn, q("event_lag"), {})
        last = await fetch_one(conn, q("last_event_position"), {})
        return await render(
            request,
            conn,
            "overview.html",
            {
                "title": "Overview",
                "funnel": funnel,
                "stages": stages,
                "chart": chart,
                "event_lag": event_lag,
                "last_event_position": last["last_position"] if last else 0,
            },
        )


async def waiting(request: Request) -> Response:
    async with console_of(request).pool.connection() as conn:
        reasons = await fetch_all(conn, q("console_waiting_reasons"), {})
        rows = await fetch_all(conn, q("console_waiting"), {"limit": LIST_LIMIT})
        moves = await fetch_all(conn, q("console_pending_moves"), {"limit": LIST_LIMIT})
        groups: dict[str, list[DictRow]] = {}
        for row in rows:
            groups.setdefault(row["reason"], []).append(row)
        return await render(
            request,
            conn,
            "waiting.html",
            {
                "title": "Waiting for a trainer",
                "reasons": reasons,
                "groups": groups,
                "shown": len(rows),
                "total": sum(r["n"] for r in reasons),
                "moves": moves,
            },
        )


async def failures(request: Request) -> Response:
    async with console_of(request).pool.connection() as conn:
        failed = await fetch_all(conn, q("console_failed_jobs"), {"limit": LIST_LIMIT})
        rejected = await fetch_all(conn, q("console_rejected_payments"), {"limit": LIST_LIMIT})
        return await render(
            request,
            conn,
            "failures.html",
            {"title": "Failures", "failed": failed, "rejected": rejected},
        )


def name_pattern(text: str) -> str:
    """ILIKE's pattern for a name containing `text`, its wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def search(request: Request) -> Response:
    """An id goes to its trace; anything else is part of a student's name."""
    text = request.query_params.get("q", "").strip()
    if text:
        try:
            return RedirectResponse(f"/trace/{UUID(text)}", status_code=303)
        except ValueError:
            pass
    async with console_of(request).pool.connection() as conn:
        students: list[DictRow] = []
        if len(text) >= 2:
            students = await fetch_all(
                conn,
                q("console_find_students"),
                {"pattern": name_pattern(text[:100]), "limit": SEARCH_LIMIT},
            )
        return await render(
            request,
            conn,
            "search.html",
            {"title": "Search", "q": text, "students": students, "too_short": len(text) == 1},
        )


@dataclass(frozen=True)
class Card:
    """One story on the trace page, with the trainers an assignment offers (signed in)."""

    story: Story
    trainers: list[DictRow]


async def trace(request: Request) -> Response:
    text = request.path_params["ref"]
    try:
        ref = UUID(text)
    except ValueError:
        raise RequestRefused(
            400,
            f"{text[:80]!r} is not an id: give a payment, purchase, allocation or student id "
            "(like 90000000-0000-4000-8000-000000000001), or search by a student's name.",
        ) from None
    signed_in = visit_of(request).operator is not None
    async with console_of(request).pool.connection() as conn:

        async def fetch(name: str, params: dict[str, Any]) -> Sequence[Row]:
            return await fetch_all(conn, q(name), params)

        stories = await load_async(fetch, ref)
        if not stories:
            raise RequestRefused(
                404, f"No payment, purchase, allocation or student has the id {ref}."
            )
        cards = []
        for story in stories:
            trainers: list[DictRow] = []
            header = story.header
            if signed_in and header["purchase_id"] is not None and header["is_active"]:
                trainers = await fetch_all(
                    conn,
                    q("console_trainers_for"),
                    {
                        "course_id": header["course_id"],
                        "student_id": header["student_id"],
                        "limit": 50,
                    },
                )
            cards.append(Card(story, trainers))
        return await render(
            request,
            conn,
            "trace.html",
            {"title": f"Trace {ref}", "ref": ref, "cards": cards},
        )


async def leaves(request: Request) -> Response:
    """Trainers' leaves not cancelled and not over; signed in: record, approve, cancel, and
    put a substitute on one session."""
    async with console_of(request).pool.connection() as conn:
        rows = await fetch_all(conn, q("leave_list"), {"trainer_id": None, "all": False})
        context = {
            "title": "Leave",
            "leaves": rows,
            "handover_days": console_of(request).leave_handover_days,
        }
        return await render(request, conn, "leaves.html", context)
