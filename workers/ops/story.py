"""A purchase's trace told as a story: where it is now and why, every payment of it (the
first, each upgrade, a refund), every allocation it had and what became of its sessions, and
every event in order, a run of identical events told once.

`make trace` prints it (`as_text`) and the console draws it (templates/trace.html) from the
same `Story`, loaded by the same named queries (sql/queries/trace.sql). Loading is written
once, without I/O: `load` is a generator that yields (query name, parameters) and is sent the
rows back; `load_sync` and `load_async` drive it on a command's or the console's connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Row = Mapping[str, Any]
Query = tuple[str, dict[str, Any]]
Loader = Generator[Query, Sequence[Row], list["Story"]]

STATE_WORDS = {
    "ok": "On track",
    "waiting": "Waiting",
    "problem": "Needs attention",
    "info": "Closed",
}


@dataclass(frozen=True)
class Story:
    """One purchase (or one payment that made none), as support reads it."""

    header: Row  # trace_headers: purchase_trace of the first payment, with names
    payments: Sequence[Row] = ()  # trace_payments (none for a lone payment)
    allocations: Sequence[Row] = ()  # trace_allocations, oldest first
    events: Sequence[Row] = ()  # trace_events
    requests: Sequence[Row] = ()  # trace_requests
    told: Sequence[Row] = ()  # trace_business_events: what the app was told

    @property
    def state(self) -> str:
        return where_it_is(self.header)[0]

    @property
    def summary(self) -> str:
        return where_it_is(self.header)[1]

    @property
    def state_words(self) -> str:
        return STATE_WORDS[self.state]

    @property
    def zone_name(self) -> str:
        return str(self.header["timezone"])

    @property
    def zone_is_valid(self) -> bool:
        return zone(self.zone_name).key == self.zone_name


def load(ref: UUID) -> Loader:
    """The stories `ref` (a payment, purchase, allocation or student id) belongs to, newest
    first; none when no such row exists."""
    found = yield ("trace_stories", {"id": ref})
    if not found:
        return []
    headers = yield ("trace_headers", {"payments": [r["payment_id"] for r in found]})
    by_payment = {h["payment_id"]: h for h in headers}
    stories = []
    for story in found:
        header = by_payment[story["payment_id"]]
        purchase = story["purchase_id"]
        if purchase is None:
            events = yield ("trace_events", {"refs": [story["payment_id"]]})
            stories.append(Story(header, events=events))
            continue
        params = {"purchase_id": purchase}
        payments = yield ("trace_payments", params)
        allocations = yield ("trace_allocations", params)
        requests = yield ("trace_requests", params)
        refs = [*(p["id"] for p in payments), purchase, *(a["id"] for a in allocations)]
        events = yield ("trace_events", {"refs": refs})
        told = yield ("trace_business_events", {"purchases": [purchase]})
        stories.append(Story(header, payments, allocations, events, requests, told))
    return stories


def load_sync(fetch: Callable[[str, dict[str, Any]], Sequence[Row]], ref: UUID) -> list[Story]:
    """`load` on a command's connection: `fetch(name, params)` runs a named query."""
    loader = load(ref)
    try:
        query = next(loader)
        while True:
            query = loader.send(fetch(*query))
    except StopIteration as done:
        return list(done.value)


async def load_async(
    fetch: Callable[[str, dict[str, Any]], Awaitable[Sequence[Row]]], ref: UUID
) -> list[Story]:
    """`load` on the console's connection."""
    loader = load(ref)
    try:
        query = next(loader)
        while True:
            query = loader.send(await fetch(*query))
    except StopIteration as done:
        return list(done.value)


def rejection_text(errors: Sequence[Mapping[str, Any]] | None) -> str:
    """A rejected payment's errors as a person reads them: `field: message; ...`."""
    return "; ".join(
        f"{e['field']}: {e.get('message', '')}" if e.get("field") else str(e.get("message", ""))
        for e in errors or []
    )


def where_it_is(row: Row) -> tuple[str, str]:
    """The answer to "where is this purchase, and why?" in one sentence, and its state
    (ok | waiting | problem | info)."""
    if row["rejected_reason"]:
        return (
            "problem",
            f"The payment was rejected ({row['rejected_reason']}): "
            f"{rejection_text(row['rejected_errors'])}",
        )
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


def payment_line(payment: Row) -> str:
    """What a payment did to its purchase: `first payment: 10 sessions`, `upgrade: 10 -> 20
    sessions (reverted: refunded)`, and `refunded` when it was."""
    if payment["kind"] == "first":
        text = f"first payment: {payment['to_tier']} sessions"
    else:
        text = f"upgrade: {payment['from_tier']} -> {payment['to_tier']} sessions"
        if payment["reverted_at"] is not None:
            text += " (reverted)"
    return f"{text}; {payment['status']}"


def allocation_sessions(allocation: Row) -> str:
    """What became of an allocation's sessions: `20 sessions (1..20): 0 completed, 20
    cancelled, 0 ahead`."""
    total = allocation["sessions"]
    if not total:
        return "no sessions"
    numbers = (
        f"number {allocation['first_number']}"
        if allocation["first_number"] == allocation["last_number"]
        else f"numbers {allocation['first_number']}..{allocation['last_number']}"
    )
    parts = [
        f"{allocation[k]} {k}"
        for k in ("completed", "missed", "cancelled", "ahead")
        if allocation[k] or k in ("completed", "ahead")
    ]
    if allocation.get("substituted"):
        parts.append(f"{allocation['substituted']} scheduled with a substitute")
    return f"{plural(total, 'session')} ({numbers}): {', '.join(parts)}"


def allocation_line(allocation: Row) -> str:
    status = allocation["status"]
    if allocation["reason"]:
        status += f" ({allocation['reason']})"
    who = (
        f"trainer {allocation['trainer']} {allocation['trainer_id']}"
        if allocation["trainer_id"]
        else "no trainer"
    )
    return f"{status}, {who}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def zone(name: str | None) -> ZoneInfo:
    """A student's time zone; UTC when the name is no IANA zone (the trace says so)."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local(value: datetime | None, zone_name: str | None = None) -> str:
    if value is None:
        return ""
    return value.astimezone(zone(zone_name)).strftime("%a %d %b %Y %H:%M:%S %Z")


def slot(start: time | None, mode: str | None, first_day: date | None) -> str:
    if start is None:
        return ""
    text = f"{start:%H:%M} {(mode or '').replace('_', ' ')}"
    return f"{text} from {first_day:%d %b %Y}" if first_day else text


def event_line(event: Row) -> str:
    """An event's own words: its detail, its job, and how often it happened in a row."""
    parts = [str(event["detail"])] if event["detail"] else []
    if event["job_id"] is not None:
        parts.append(f"(job {event['job_id']})")
    if event["times"] > 1:
        parts.append(f"x{event['times']}, the last at {event['last_at']:%H:%M:%S}")
    return " ".join(parts)


def as_text(stories: Sequence[Story]) -> str:
    """`make trace`: each story in full, no field cut short; stories apart by a rule."""
    rule = "\n" + "=" * 78 + "\n\n"
    return rule.join(_story_text(s) for s in stories)


def _story_text(story: Story) -> str:
    h, tz = story.header, story.zone_name
    title = f"{h['student']} · {h['course']}"
    out = [
        title if h["purchase_id"] is None else f"{title} · purchase {h['purchase_id']}",
        f"{story.state_words}: {story.summary}",
        "",
        *_facts(story),
    ]
    if story.payments:
        out += ["", "Payments"]
        out += [
            f"  {local(p['created_at'], tz)}  {p['id']}  {payment_line(p)}" for p in story.payments
        ]
    if story.allocations:
        out += ["", "Allocations, oldest first"]
        for a in story.allocations:
            out.append(f"  {a['id']}  {allocation_line(a)}")
            out.append(f"      {allocation_sessions(a)}")
            if a["reason_detail"]:
                out.append(f"      why: {a['reason_detail']}")
    if story.requests:
        out += ["", "Requests"]
        out += [
            f"  {local(r['requested_at'], tz)}  {r['kind']} {r['id']} by {r['requested_by']}: "
            f"{r['what']}; {r['status']}{': ' + r['outcome'] if r['outcome'] else ''}"
            for r in story.requests
        ]
    out += ["", f"Timeline ({tz if story.zone_is_valid else 'UTC'})"]
    out += [
        f"  {local(e['at'], tz)}  {e['stage']:<10} {e['event']:<16} "
        f"{e['actor'] or 'pipeline':<10} {event_line(e)}".rstrip()
        for e in story.events
    ] or ["  nothing has happened to this payment yet"]
    if h["purchase_id"] is not None:
        out += ["", "What the app was told (business events; position in the relay's feed)"]
        out += [
            f"  {local(e['at'], tz)}  {e['type']:<24} {e['role']:<8} "
            f"{e['detail'] or ''}  {'#' + str(e['position']) if e['position'] else ''}".rstrip()
            for e in story.told
        ] or ["  no event yet"]
    return "\n".join(out) + "\n"


def _facts(story: Story) -> list[str]:
    h, tz = story.header, story.zone_name
    facts = [("student", f"{h['student_id']} (times in {tz})")]
    if not story.zone_is_valid:
        facts[0] = ("student", f"{h['student_id']} ({tz} is no IANA time zone: times in UTC)")
    if h["purchase_id"] is None:
        facts.append(("payment", f"{h['payment_id']}, {h['payment_status']}"))
        if h["rejected_reason"]:
            facts.append(("rejected", f"{h['rejected_reason']}"))
            facts += [
                ("", f"{e.get('field') or '(payment)'}: {e.get('message', '')}")
                for e in h["rejected_errors"] or []
            ]
    else:
        facts.append(
            (
                "schedule",
                f"{h['purchase_tier']} sessions, "
                f"{slot(h['preferred_time_slot'], h['schedule_mode'], h['start_date'])}, "
                f"{h['session_duration_minutes']} min, {h['learning_mode']}",
            )
        )
        if h["group_size"] and h["group_size"] > 1:
            facts.append(("group", f"{h['group_size']} students"))
        if h["preferred_trainer_id"]:
            outcome = h["preferred_trainer_outcome"] or "not decided yet"
            facts.append(("student chose", f"trainer {h['preferred_trainer_id']} ({outcome})"))
        if h["defaults_applied"]:
            facts.append(("defaults used", ", ".join(h["defaults_applied"])))
        if h["unused_keys"]:
            facts.append(("metadata unused", ", ".join(h["unused_keys"])))
        if h["next_session_at"]:
            facts.append(("next session", local(h["next_session_at"], tz)))
    for stage in ("purchase", "allocation", "sessions"):
        if h[f"{stage}_job"]:
            text = f"{h[f'{stage}_job']}, started {h[f'{stage}_attempts']} time(s)"
            if h[f"{stage}_error"]:
                text += f"; last error: {h[f'{stage}_error']}"
            facts.append((f"{stage} job", text))
    width = max(len(k) for k, _ in facts)
    return [f"{k:>{width}}  {v}" for k, v in facts]
