"""What the console changes, and who may: signing in with an operator's own token, the CSRF
token of every form, and the actions (replay, retry, assign, reschedule; record, approve and
cancel a trainer's leave, a substitute for one session), each one call of an
operator function given the session's id, from which the database itself records
`console:<operator>` as the actor.

Every POST is checked in the same order, and a refusal changes nothing: the person must be
signed in (except to sign in or out; checked before the body is read), the body must be a
small form (access.BoundedBody), the form's CSRF token must be this cookie's, and every value
must parse. What the database refuses (an unknown id, a purchase that is not active, an
override without a note, a slot that does not parse, a session that has just ended) comes
back in its own words."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import date
from typing import Any, LiteralString
from uuid import UUID

import psycopg
from psycopg.rows import DictRow
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from workers.console import access
from workers.console.access import visit_of
from workers.console.rendering import console_of, render
from workers.database.connections import fetch_one
from workers.database.sql import q
from workers.errors import RequestRefused
from workers.stages.contract import Stage

TOKEN_LIMIT = 200  # an operator's token is 43 characters; the database refuses past 200

# The database's refusals, by SQLSTATE class: what the page's status says.
REFUSAL_STATUS = {
    "P0002": 404,  # no_data_found: no such payment, purchase, trainer ...
    "42501": 403,  # insufficient_privilege: the session ended (signed out, expired, revoked)
    "22": 400,  # data exception: a value the function does not accept
    "55": 409,  # object not in prerequisite state: a finished or refunded purchase
    "23P01": 409,  # exclusion_violation: another leave of the trainer's in those days
}


# -- the session ------------------------------------------------------------------------------


async def checked_form(request: Request, *, signed_in: bool = True) -> FormData:
    """The POSTed form, once the person (for an action), the body and the CSRF token have
    been checked; RequestRefused (403, 413) otherwise."""
    visit = visit_of(request)
    if signed_in and visit.operator is None:
        raise RequestRefused(
            403,
            "Sign in with your operator token first: nothing was done. (No token? Whoever "
            "runs the pipeline's database gives one: python -m workers operator add <name>.)",
        )
    form = await request.form(max_files=0, max_fields=50)
    if not access.csrf_matches(console_of(request).access.key, visit.cookie, form.get("csrf")):
        raise RequestRefused(
            403,
            "The form's CSRF token is missing or is not this browser session's, so nothing "
            "was done. Reload the page and submit the form again.",
        )
    return form


def session_of(request: Request) -> str:
    """The session id the operator functions check and take their actor from."""
    return visit_of(request).cookie


def back_to(form: FormData, default: str = "/") -> str:
    """Where to go after an action: a path of this console, never another site."""
    target = form.get("back")
    if isinstance(target, str) and target.startswith("/") and not target.startswith("//"):
        return target
    return default


def done(request: Request, target: str, message: str, kind: str = "ok") -> Response:
    console_of(request).access.flashes.put(visit_of(request).cookie, kind, message)
    return RedirectResponse(target, status_code=303)


# -- signing in -------------------------------------------------------------------------------


async def signin_page(request: Request, error: str | None, status: int = 200) -> Response:
    operators = await access.operator_count(console_of(request).pool)
    context = {"title": "Sign in", "error": error, "operators": operators}
    return await render(request, None, "signin.html", context, status)


async def signin_form(request: Request) -> Response:
    return await signin_page(request, None)


async def signin(request: Request) -> Response:
    """The throttle first (before the body is read or the database asked), then the form;
    the token names the operator, and the session is a new id (never the visitor's)."""
    console = console_of(request)
    client = request.client.host if request.client else "unknown"
    limited = console.access.throttle.attempt(client)
    if limited is not None:
        whose, wait = limited
        raise RequestRefused(
            429,
            (
                "Too many sign-in attempts from your address"
                if whose == "client"
                else "Too many sign-in attempts on this console at once"
            )
            + f": nothing was checked. Try again in {wait} s.",
            retry_after=wait,
        )
    form = await checked_form(request, signed_in=False)
    token = form.get("token")
    token = token.strip() if isinstance(token, str) else ""
    session = access.new_id()
    found = None
    if token and len(token) <= TOKEN_LIMIT:
        found = await access.sign_in(console.pool, token, session, client)
    if found is None:
        return await signin_page(
            request,
            "That is not the token of an operator who may sign in (a token is shown once, "
            "when its operator is added; a revoked operator's no longer works).",
            403,
        )
    visit_of(request).become(session, found["operator"], found["expires_at"])
    return done(request, back_to(form), f"Signed in as {found['operator']}.")


async def signout(request: Request) -> Response:
    await checked_form(request, signed_in=False)
    visit = visit_of(request)
    if visit.operator is not None:
        await access.sign_out(console_of(request).pool, visit.cookie)
    visit.become(access.new_id(), None, None)
    return done(request, "/", "Signed out.")


# -- parsing ----------------------------------------------------------------------------------


def text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def uuid_field(form: FormData, name: str, what: str) -> UUID:
    value = text_field(form, name)
    if value is None:
        raise RequestRefused(400, f"Give the {what}'s id.")
    try:
        return UUID(value)
    except ValueError:
        raise RequestRefused(
            400,
            f"{value[:80]!r} is not a {what} id: an id looks like "
            "90000000-0000-4000-8000-000000000001.",
        ) from None


def stage_field(form: FormData) -> Stage:
    value = text_field(form, "stage") or ""
    try:
        return Stage(value)
    except ValueError:
        raise RequestRefused(
            400,
            f"{value[:40]!r} is not a stage: the stages are purchase, allocation and sessions.",
        ) from None


def date_field(form: FormData, name: str) -> date | None:
    value = text_field(form, name)
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise RequestRefused(400, f"{value[:40]!r} is not a date: give YYYY-MM-DD.") from None


# -- calling the operator functions -----------------------------------------------------------


async def call(request: Request, query: LiteralString, params: Mapping[str, Any]) -> DictRow:
    """One call of an operator function; its refusal becomes RequestRefused with the
    database's own message (the call is its own transaction: nothing changed)."""
    async with console_of(request).pool.connection() as conn:
        try:
            row = await fetch_one(conn, query, params)
        except psycopg.Error as exc:
            # psycopg files a refusal such as "object not in prerequisite state" (SQLSTATE
            # 55000: a request decided already, a trainer who cannot take a move) under
            # OperationalError too: only a lost connection or a server going away (no
            # SQLSTATE, classes 08 and 57) is the "unavailable" page.
            if isinstance(exc, psycopg.OperationalError) and (
                exc.sqlstate is None or exc.sqlstate[:2] in ("08", "57")
            ):
                raise
            raise RequestRefused(refusal_status(exc), refusal_message(exc)) from exc
    assert row is not None
    return row


def refusal_status(exc: psycopg.Error) -> int:
    state = exc.sqlstate or ""
    return REFUSAL_STATUS.get(state) or REFUSAL_STATUS.get(state[:2]) or 500


def refusal_message(exc: psycopg.Error) -> str:
    message = exc.diag.message_primary or str(exc)
    hint = exc.diag.message_hint
    return f"The database refused it: {message}" + (f" ({hint})" if hint else "")


async def outcome(request: Request, status_query: LiteralString, request_id: int) -> DictRow | None:
    """The allocation stage's answer to a request, waited for a little (a worker normally
    decides within a second); None while it is still open."""
    console = console_of(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + console.outcome_wait
    while True:
        async with console.pool.connection() as conn:
            row = await fetch_one(conn, status_query, {"request_id": request_id})
        if row is not None and row["status"] != "open":
            return row
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(0.2)


async def report(
    request: Request, form: FormData, purchase: UUID, what: str, row: DictRow, status: str
) -> Response:
    """Back to the purchase's trace with the allocation stage's answer to the request."""
    request_id = row["request_id"]
    target = back_to(form, f"/trace/{purchase}")
    decided = await outcome(request, q(status), request_id)
    if decided is None:
        return done(
            request,
            target,
            f"{what} request {request_id} is recorded; the allocation stage has not decided it "
            "yet (is a worker running?). Its outcome will show on this page.",
            "warning",
        )
    kind = "ok" if decided["status"] == "done" else "error"
    message = f"{what} request {request_id} {decided['status']}: {decided['outcome']}"
    return done(request, target, message, kind)


# -- the actions ------------------------------------------------------------------------------


async def replay(request: Request) -> Response:
    """Run one row's stage again: a failed job, or a waiting purchase's allocation (retry)."""
    form = await checked_form(request)
    stage = stage_field(form)
    ref = uuid_field(
        form, "ref_id", {"purchase": "payment", "allocation": "purchase"}.get(stage, "allocation")
    )
    row = await call(
        request,
        q("replay_stage"),
        {"stage": stage.value, "ref_id": ref, "session": session_of(request)},
    )
    return done(
        request,
        back_to(form, f"/trace/{ref}"),
        f"{stage} {ref} enqueued again as job {row['job_id']}.",
    )


async def replay_failed(request: Request) -> Response:
    form = await checked_form(request)
    stage = stage_field(form)
    row = await call(
        request, q("replay_failed"), {"stage": stage.value, "session": session_of(request)}
    )
    return done(
        request,
        back_to(form, "/failures"),
        f"{row['replayed']} failed {stage} job(s) enqueued again.",
    )


async def assign(request: Request) -> Response:
    """Assign or re-assign a trainer: the same rules as the allocation stage, unless an
    override with a note sets aside those it may."""
    form = await checked_form(request)
    purchase = uuid_field(form, "purchase_id", "purchase")
    trainer = uuid_field(form, "trainer_id", "trainer")
    override = form.get("override") in ("on", "true", "1")
    note = text_field(form, "note")
    row = await call(
        request,
        q("request_assignment"),
        {
            "purchase_id": purchase,
            "trainer_id": trainer,
            "override": override,
            "note": note,
            "session": session_of(request),
        },
    )
    return await report(request, form, purchase, "Assignment", row, "request_status")


async def reschedule(request: Request) -> Response:
    form = await checked_form(request)
    purchase = uuid_field(form, "purchase_id", "purchase")
    params = {
        "purchase_id": purchase,
        "time_slot": text_field(form, "time_slot"),
        "start_date": date_field(form, "start_date"),
        "schedule_mode": text_field(form, "mode"),
        "session": session_of(request),
    }
    row = await call(request, q("request_reschedule"), params)
    return await report(request, form, purchase, "Reschedule", row, "schedule_change_status")


# -- leave and substitutes (migration 0019: each is carried out at once, in its call) ---------


def leave_id_field(form: FormData) -> int:
    value = text_field(form, "leave_id") or ""
    if not value.isdigit() or len(value) > 18:
        raise RequestRefused(400, f"{value[:40]!r} is not a leave number.")
    return int(value)


async def leave_request(request: Request) -> Response:
    form = await checked_form(request)
    trainer = uuid_field(form, "trainer_id", "trainer")
    first, last = date_field(form, "first_day"), date_field(form, "last_day")
    if first is None or last is None:
        raise RequestRefused(400, "Give the leave's first and last day.")
    row = await call(
        request,
        q("leave_request"),
        {
            "trainer_id": trainer,
            "first_day": first,
            "last_day": last,
            "reason": text_field(form, "reason"),
            "session": session_of(request),
        },
    )
    leave = int(row["leave_id"])
    if form.get("approve") in ("on", "true", "1"):
        return await _approve(request, form, leave)
    return done(request, back_to(form, "/leaves"), f"Leave {leave} recorded; approve it to act.")


async def leave_approve(request: Request) -> Response:
    form = await checked_form(request)
    return await _approve(request, form, leave_id_field(form))


async def _approve(request: Request, form: FormData, leave: int) -> Response:
    row = await call(
        request,
        q("leave_approve_summary"),
        {
            "leave_id": leave,
            "handover_days": console_of(request).leave_handover_days,
            "session": session_of(request),
        },
    )
    message = (
        f"Leave {leave} approved: {row['substituted']} session(s) with a substitute, "
        f"{row['cancelled']} cancelled (their make-ups follow)"
    )
    if row["handed_over"]:
        message += f", {row['handed_over']} in courses handed over to other trainers"
    return done(request, back_to(form, "/leaves"), message + ".")


async def leave_cancel(request: Request) -> Response:
    form = await checked_form(request)
    leave = leave_id_field(form)
    row = await call(
        request,
        q("leave_cancel_summary"),
        {"leave_id": leave, "session": session_of(request)},
    )
    return done(
        request,
        back_to(form, "/leaves"),
        f"Leave {leave} cancelled: {row['given_back']} session(s) back with their trainer, "
        f"{row['kept']} kept by their substitute.",
    )


async def substitute(request: Request) -> Response:
    form = await checked_form(request)
    session_id = uuid_field(form, "session_id", "session")
    trainer = uuid_field(form, "trainer_id", "trainer") if text_field(form, "trainer_id") else None
    row = await call(
        request,
        q("substitute_session"),
        {"session_id": session_id, "trainer_id": trainer, "session": session_of(request)},
    )
    return done(
        request,
        back_to(form, "/leaves"),
        f"Session {session_id} is now trainer {row['substitute_id']}'s.",
    )


async def decide_move(request: Request) -> Response:
    """Approve (or with a substitute) or reject a request to move one session; the database
    checks the rules for that one session, under its locks, and says which one failed."""
    form = await checked_form(request)
    request_id = uuid_field(form, "request_id", "move request")
    back = back_to(form)
    if form.get("decision") == "reject":
        reason = text_field(form, "reason")
        if reason is None:
            raise RequestRefused(400, "Say why the move is rejected: the requester reads it.")
        row = await call(
            request,
            q("move_reject"),
            {"request_id": request_id, "reason": reason, "session": session_of(request)},
        )
        return done(request, back, str(row["outcome"]))
    substitute = form.get("substitute") in ("on", "true", "1")
    row = await call(
        request,
        q("move_approve"),
        {"request_id": request_id, "substitute": substitute, "session": session_of(request)},
    )
    return done(request, back, f"Move request {request_id} approved: {row['outcome']}.")
