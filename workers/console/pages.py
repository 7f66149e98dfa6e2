"""The console's pages, each a few named queries (sql/queries/console.sql) read as
kc_operator: the overview, the waiting purchases, the failures, the search and the trace."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from psycopg.rows import DictRow
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from workers.console.actions import signed_in_name
from workers.console.app import console_of, render, zone
from workers.console.charts import StagePoint, stage_chart
from workers.database.connections import AsyncConn, fetch_all, fetch_one
from workers.database.sql import q
from workers.errors import RequestRefused

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
class Purchase:
    """One payment's trace: where it is, why, what happened when, and the admin requests."""

    row: DictRow
    state: str  # ok | waiting | problem | info
    summary: str
    history: list[DictRow]
    events: list[DictRow]  # the business events written for the purchase
    requests: list[DictRow]
    trainers: list[DictRow]
    zone_name: str
    zone_is_valid: bool


def where_it_is(row: Mapping[str, Any]) -> tuple[str, str]:
    """The answer to "where is this purchase, and why?" in one sentence."""
    if row["rejected_reason"]:
        problems = "; ".join(
            f"{e.get('field', '')}: {e.get('message', '')}" for e in row["rejected_errors"] or []
        )
        return "problem", f"The payment was rejected ({row['rejected_reason']}): {problems}"
    if row["purchase_id"] is None:
        if row["purchase_job"] == "failed":
            return "problem", f"The purchase stage failed: {row['purchase_error']}"
        if row["payment_status"] != "succeeded":
            return "info", f"The payment is {row['payment_status']}: no purchase is made for it."
        return "waiting", "The payment is waiting for the purchase stage."
    if row["allocation_job"] == "failed":
        return "problem", f"The allocation stage failed: {row['allocation_error']}"
    if row["sessions_job"] == "failed":
        return "problem", f"The sessions stage failed: {row['sessions_error']}"
    if not row["is_active"]:
        if row["completed_at"]:
            return "info", "The course is finished."
        return "info", "The purchase is no longer active (refunded)."
    status = row["allocation_status"]
    if status == "pending":
        return (
            "waiting",
            f"Waiting for a trainer ({row['allocation_reason']}): "
            f"{row['allocation_reason_detail']}",
        )
    if status == "approved":
        if row["sessions_written"]:
            return (
                "ok",
                f"Trainer {row['trainer']} teaches it: {row['sessions_written']} sessions "
                f"written, {row['sessions_ahead'] or 0} ahead.",
            )
        return "waiting", f"Trainer {row['trainer']} is chosen; the sessions are being written."
    return "waiting", "The purchase is waiting for the allocation stage."


async def load_purchase(conn: AsyncConn, row: DictRow, signed_in: bool) -> Purchase:
    refs = [row["payment_id"]]
    requests: list[DictRow] = []
    trainers: list[DictRow] = []
    if row["purchase_id"] is not None:
        allocations = await fetch_all(
            conn,
            q("console_allocations_of"),
            {
                "student_id": row["student_id"],
                "course_id": row["course_id"],
                "purchase_id": row["purchase_id"],
            },
        )
        refs += [row["purchase_id"], *(a["id"] for a in allocations)]
        requests = await fetch_all(conn, q("console_requests"), {"purchase_id": row["purchase_id"]})
        if signed_in and row["is_active"]:
            trainers = await fetch_all(
                conn,
                q("console_trainers_for"),
                {"course_id": row["course_id"], "student_id": row["student_id"], "limit": 50},
            )
    history = await fetch_all(conn, q("console_history"), {"refs": refs})
    events = (
        await fetch_all(conn, q("trace_events"), {"purchases": [row["purchase_id"]]})
        if row["purchase_id"] is not None
        else []
    )
    state, summary = where_it_is(row)
    zone_name = row["timezone"]
    return Purchase(
        row,
        state,
        summary,
        history,
        events,
        requests,
        trainers,
        zone_name,
        zone(zone_name).key == zone_name,
    )


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
    signed_in = signed_in_name(request) is not None
    async with console_of(request).pool.connection() as conn:
        payments = [
            r["payment_id"] for r in await fetch_all(conn, q("console_resolve"), {"id": ref})
        ]
        if not payments:
            raise RequestRefused(
                404, f"No payment, purchase, allocation or student has the id {ref}."
            )
        rows = await fetch_all(conn, q("console_trace"), {"payments": payments})
        purchases = [await load_purchase(conn, row, signed_in) for row in rows]
        return await render(
            request,
            conn,
            "trace.html",
            {"title": f"Trace {ref}", "ref": ref, "purchases": purchases},
        )
