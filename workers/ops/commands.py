"""Operator commands: status, trace, failures, replay, doctor, events, and the console's
operators (add, list, revoke). Each is one or two named queries over the views or functions;
the same answers are one `SELECT` away in psql."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from uuid import UUID

from workers.database import migrate
from workers.database.connections import (
    OPERATOR_ROLE,
    SyncConn,
    connect_sync,
    refused_role,
)
from workers.database.sql import SQL_DIR, q
from workers.errors import ConfigurationError
from workers.ops import story
from workers.settings import Settings


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def status(conn: SyncConn, settings: Settings) -> str:
    overview = conn.execute(q("stage_overview")).fetchall()
    counts = conn.execute(
        q("pipeline_counts"), {"stuck_after": timedelta(seconds=settings.heal_after_seconds)}
    ).fetchone()
    lifecycle = conn.execute(
        q("lifecycle_counts"), {"grace": timedelta(minutes=settings.completion_grace_minutes)}
    ).fetchone()
    parts = [table(overview)]
    parts += [
        "  ".join(f"{k.replace('_', ' ')}: {v}" for k, v in row.items())
        for row in (counts, lifecycle)
        if row
    ]
    parts.append(event_status(conn))
    return "\n\n".join(parts)


def event_status(conn: SyncConn) -> str:
    """The feed's last position and how far behind each consumer (the relay) is."""
    last = conn.execute(q("last_event_position")).fetchone()
    lag = conn.execute(q("event_lag")).fetchall()
    head = f"business events: last position {last['last_position'] if last else 0}"
    if not lag:
        return head + "  (no consumer: the relay runs when REDIS_URL is set; docs/events.md)"
    return "\n".join(
        [head]
        + [
            f"  consumer {r['consumer']}: at {r['position']}, {r['events_behind']} event(s) "
            f"and {r['seconds_behind']}s behind"
            for r in lag
        ]
    )


def trace(conn: SyncConn, ref: UUID) -> str | None:
    """The story of every purchase (or lone payment) `ref` belongs to; None for an unknown id."""
    stories = story.load_sync(lambda name, params: conn.execute(q(name), params).fetchall(), ref)
    return story.as_text(stories) if stories else None


def failures(conn: SyncConn) -> str:
    """Everything that stopped and waits for a person: jobs held as failed after their last
    attempt, and payments rejected for their metadata (fix the row, then replay)."""
    failed = conn.execute(q("failures")).fetchall()
    rejected = conn.execute(q("rejected_payments_list")).fetchall()
    jobs = table(failed) if failed else "(none)"
    payments = "\n".join(
        f"{r['payment_id']}  rejected {r['rejected_at']:%Y-%m-%d %H:%M:%S %Z} ({r['reason']}, "
        f"{r['rejections']} time(s)): {story.rejection_text(r['errors'])}"
        for r in rejected
    )
    return (
        f"Failed jobs: {len(failed)}\n{jobs}\n\n"
        f"Rejected payments: {len(rejected)}\n{payments or '(none)'}"
        + (
            "\n\nFix a rejected payment's metadata (UPDATE payments ...), then "
            "make replay STAGE=purchase ID=<payment id>"
            if rejected
            else ""
        )
    )


def replay(conn: SyncConn, stage: str, ref: UUID | None) -> str:
    # No console session: stage_history names the database login as the one who asked.
    if ref is None:
        row = conn.execute(q("replay_failed"), {"stage": stage, "session": None}).fetchone()
        return f"{row['replayed'] if row else 0} failed {stage} job(s) enqueued again"
    params = {"stage": stage, "ref_id": ref, "session": None}
    row = conn.execute(q("replay_stage"), params).fetchone()
    return f"{stage} {ref} enqueued again as job {row['job_id'] if row else '?'}"


def request_move(
    conn: SyncConn,
    session_id: UUID,
    new_date: date,
    new_time: str,
    request_type: str,
    reason: str,
    notes: str | None,
) -> str:
    """Records a request to move one session (refused: a psycopg error saying why)."""
    params = {
        "session_id": session_id,
        "new_date": new_date,
        "new_time": new_time,
        "request_type": request_type,
        "reason": reason,
        "notes": notes,
        "session": None,  # no console session: the actor is the database login
    }
    row = conn.execute(q("move_request"), params).fetchone()
    assert row is not None
    status = conn.execute(q("move_status"), {"request_id": row["request_id"]}).fetchone()
    assert status is not None
    if status["status"] == "approved":  # kc_settings.moves_auto_approve
        return f"move request {status['id']} approved at once ({status['reviewed_by']}): " + str(
            status["outcome"]
        )
    return (
        f"move request {status['id']} pending: an operator approves it "
        f"(make move-approve ID={status['id']}) or rejects it"
    )


def decide_move(
    conn: SyncConn, action: str, request_id: UUID, *, substitute: bool, reason: str | None
) -> str:
    """approve, reject or cancel one move request; the database's answer, or its refusal."""
    if action == "approve":
        params: dict[str, Any] = {"request_id": request_id, "substitute": substitute}
    elif action == "reject":
        params = {"request_id": request_id, "reason": reason}
    else:
        params = {"request_id": request_id}
    row = conn.execute(q(f"move_{action}"), {**params, "session": None}).fetchone()
    assert row is not None
    return str(row["outcome"])


def list_moves(conn: SyncConn, status: str | None, limit: int) -> str:
    rows = conn.execute(q("moves_list"), {"status": status, "limit": limit}).fetchall()
    return table(rows)


def add_operator(conn: SyncConn, name: str) -> str:
    """Adds a console operator (or gives a revoked one a new token) and returns what to show,
    the token included: 256 random bits, shown this once; the database keeps its SHA-256."""
    token = secrets.token_urlsafe(32)
    row = conn.execute(q("operator_add"), {"name": name, "token": token}).fetchone()
    assert row is not None
    who = row["operator"]
    done = "has a new token" if row["reinstated"] else "is added"
    return (
        f"operator {who} {done}. {who}'s token, shown this once (the database keeps only its "
        f"SHA-256):\n\n    {token}\n\n"
        f"Give it to {who} privately; {who} signs in to the console with it, and what {who} "
        f"does there is recorded as console:{who}.\nLost or leaked: python -m workers operator "
        f"revoke {who}, then add {who} again for a new one."
    )


def list_operators(conn: SyncConn) -> str:
    rows = conn.execute(q("operator_list")).fetchall()

    def when(at: datetime | None) -> str:
        return "" if at is None else f"{at:%Y-%m-%d %H:%M %Z}"

    shown = [
        {
            "name": r["name"],
            "state": "live" if r["revoked_at"] is None else f"revoked {when(r['revoked_at'])}",
            "added": f"{when(r['created_at'])} by {r['created_by']}",
            "token issued": when(r["token_issued_at"]),
            "live sessions": r["live_sessions"],
            "last sign-in": when(r["last_sign_in"]),
        }
        for r in rows
    ]
    if not shown:
        return "no console operator yet: python -m workers operator add <name>"
    return table(shown)


def revoke_operator(conn: SyncConn, name: str) -> str:
    row = conn.execute(q("operator_revoke"), {"name": name}).fetchone()
    ended = row["sessions_ended"] if row else 0
    return (
        f"operator {name.strip()} is revoked: their token no longer signs in, and {ended} "
        "session(s) of theirs ended now."
    )


@dataclass(frozen=True)
class Problem:
    what: str
    fix: str


def expected_triggers() -> set[tuple[str, str]]:
    """(trigger, table) pairs declared in the canonical schema file."""
    text = (SQL_DIR / "schema.sql").read_text(encoding="utf-8")
    return set(re.findall(r"^CREATE TRIGGER (\w+) .*? ON (?:\w+\.)?(\w+) ", text, re.MULTILINE))


def doctor(url: str, settings: Settings) -> list[Problem]:
    """Every check an operator would run by hand, as one command: the database answers,
    migrations are at head, pgqueuer's schema, the triggers, a worker listening, the
    backlog's age, held jobs. Each problem comes with its fix."""
    try:
        conn = connect_sync(url, timeout=5, role=OPERATOR_ROLE)
    except ConfigurationError as exc:
        if exc.__cause__ is not None and refused_role(exc.__cause__, OPERATOR_ROLE):
            return [Problem(str(exc), f"as the database's owner: GRANT {OPERATOR_ROLE} TO <login>")]
        return [
            Problem(
                f"the database is not reachable: {str(exc.__cause__ or exc).strip()}",
                "check DATABASE_URL; without it, `make run-workers` starts the embedded server",
            )
        ]
    with conn:
        behind = _migrations(conn)
        if behind:
            return behind  # the other checks read objects the migrations create
        return [
            *_database_access(conn),
            *_pgqueuer_schema(url),
            *_triggers(conn),
            *_workers(conn),
            *_backlog(conn, settings),
            *_held_jobs(conn),
            *_rejected_payments(conn),
            *_events(conn, settings),
        ]


def _migrations(conn: SyncConn) -> list[Problem]:
    current = migrate.current_revision(conn)
    head = migrate.head_revision()
    if current == head:
        return []
    return [Problem(f"migrations are at {current}, head is {head}", "make migrate")]


def _database_access(conn: SyncConn) -> list[Problem]:
    """Only the project's roles may connect (migration 0015); a copy or a restore of the
    database does not keep that."""
    row = conn.execute(q("database_access")).fetchone()
    if row is None or not row["public_may_connect"]:
        return []
    return [
        Problem(
            f"any login of the server may connect to database {row['database']} (PUBLIC has "
            "CONNECT: a copy or a restore does not keep the database's privileges)",
            "as the database's owner or a superuser, in psql: SELECT kc_limit_database_access();",
        )
    ]


def _pgqueuer_schema(url: str) -> list[Problem]:
    try:
        asyncio.run(_verify_pgqueuer(url))
    except RuntimeError as exc:  # what pgqueuer's verify_structure raises
        return [
            Problem(
                f"pgqueuer's schema does not match its version: {exc}",
                "make migrate (pgqueuer's schema ships in the migrations)",
            )
        ]
    return []


def _triggers(conn: SyncConn) -> list[Problem]:
    """Every trigger of sql/schema.sql exists and is enabled."""
    states = {
        (r["name"], r["table_name"]): r["enabled"]
        for r in conn.execute(q("trigger_states")).fetchall()
    }
    problems: list[Problem] = []
    for name, table_name in sorted(expected_triggers()):
        if (name, table_name) not in states:
            problems.append(
                Problem(
                    f"trigger {name} on {table_name} is missing",
                    "make migrate; if it persists, restore it from sql/schema.sql",
                )
            )
        elif not states[(name, table_name)]:
            problems.append(
                Problem(
                    f"trigger {name} on {table_name} is disabled",
                    f"psql: ALTER TABLE {table_name} ENABLE TRIGGER {name};",
                )
            )
    return problems


def _workers(conn: SyncConn) -> list[Problem]:
    workers = conn.execute(q("live_workers")).fetchone()
    if workers and workers["listeners"] > 0:
        return []
    return [Problem("no worker is running (nobody LISTENs on this database)", "make run-workers")]


def _backlog(conn: SyncConn, settings: Settings) -> list[Problem]:
    return [
        Problem(
            f"the {row['stage']} backlog is {row['seconds']:.0f}s old",
            "make status; run more workers (make run-workers on another machine)",
        )
        for row in conn.execute(q("oldest_backlog")).fetchall()
        if row["seconds"] > settings.heal_after_seconds
    ]


def _held_jobs(conn: SyncConn) -> list[Problem]:
    failed = conn.execute(q("failures")).fetchall()
    if not failed:
        return []
    return [
        Problem(
            f"{len(failed)} job(s) failed after their last attempt",
            "make failures; fix the cause, then make replay STAGE=<stage> ID=<id> "
            "(or STAGE=<stage> alone for all of a stage)",
        )
    ]


def _rejected_payments(conn: SyncConn) -> list[Problem]:
    rejected = conn.execute(q("rejected_payments_list")).fetchall()
    if not rejected:
        return []
    return [
        Problem(
            f"{len(rejected)} payment(s) rejected for their metadata, waiting for a fix",
            "make failures; fix the payment's metadata, then "
            "make replay STAGE=purchase ID=<payment id>",
        )
    ]


def _events(conn: SyncConn, settings: Settings) -> list[Problem]:
    """With REDIS_URL: Redis answers and a relay runs. Any consumer: not far behind."""
    problems: list[Problem] = []
    if settings.redis_url is not None:
        from workers.events.relay import APPLICATION_NAME, connect_redis, redacted

        url = settings.redis_url.get_secret_value()
        try:
            with connect_redis(url) as client:
                client.ping()
        except Exception as exc:  # redis.RedisError, or a URL it cannot read
            problems.append(
                Problem(
                    f"Redis at {redacted(url)} does not answer ({exc}); business events wait "
                    "in the outbox",
                    "start Redis, or correct REDIS_URL",
                )
            )
        relays = conn.execute(q("running_relays"), {"name": APPLICATION_NAME}).fetchone()
        if not relays or relays["n"] == 0:
            problems.append(
                Problem(
                    "REDIS_URL is set but no relay is running: business events are not published",
                    "make run-workers (it runs the relay when REDIS_URL is set)",
                )
            )
    for row in conn.execute(q("event_lag")).fetchall():
        if row["events_behind"] > 0 and row["seconds_behind"] > settings.heal_after_seconds:
            problems.append(
                Problem(
                    f"event consumer {row['consumer']} is {row['events_behind']} event(s) and "
                    f"{row['seconds_behind']}s behind (events it has not read are kept)",
                    "make run-workers with REDIS_URL set (the relay), and make status; a "
                    "consumer that is gone for good: psql: SELECT drop_event_consumer("
                    f"'{row['consumer']}');",
                )
            )
    return problems


def print_events(conn: SyncConn, *, after: int, limit: int, follow: bool, as_json: bool) -> int:
    """`python -m workers events`: the events after a position; with follow, then every new
    one as it commits (LISTEN kc_business_events) until Ctrl-C."""
    if after < 0 or not 1 <= limit <= 10_000:
        print("--after is 0 or more; --limit is 1 to 10000", file=sys.stderr)
        return 2
    if follow:
        conn.execute("LISTEN kc_business_events")
    position = after
    while True:
        rows = conn.execute(q("events_after"), {"position": position, "limit": limit}).fetchall()
        for row in rows:
            print(event_line(row, as_json), flush=True)
        if not follow:
            return 0
        if rows:
            position = int(rows[-1]["pos"])
            if len(rows) == limit:
                continue
        for _ in conn.notifies(timeout=5.0, stop_after=1):
            break


def event_line(row: dict[str, Any], as_json: bool) -> str:
    event: dict[str, Any] = row["event"]
    if as_json:
        return json.dumps({"position": row["pos"], "event": event}, ensure_ascii=False)
    about = next(
        (
            f"{key} {event[key]}"
            for key in ("title", "allocationId", "sessionId", "purchaseId", "targetId")
            if key in event
        ),
        "",
    )
    return (
        f"{row['pos']:>8}  {row['occurred_at']:%Y-%m-%d %H:%M:%S}  {row['type']:<23}  "
        f"{event.get('role', '')} {event.get('userId', '')}  {about}"
    )


async def _verify_pgqueuer(url: str) -> None:
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    from workers.runtime.driver import ListeningDriver

    driver = await ListeningDriver.connect(url, name="koding-caravan-doctor", role=OPERATOR_ROLE)
    try:
        await QueueManager(Queries(driver)).verify_structure()
    finally:
        await driver.close()
