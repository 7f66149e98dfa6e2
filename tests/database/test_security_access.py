"""Who may connect to the pipeline's database, and what a connected role may still disturb
(issue 21): a login with no grants cannot connect (so it holds no lock and sends no NOTIFY);
a worker adds history but never changes it, and draws from sequences but never sets one; a
worker drops NOTIFY payloads the pipeline does not send with one warning; reschedule's start
date is bounded as metadata's is."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import DictRow

from tests import factories as f
from tests.database.test_security_roles import as_user, cannot_connect, refused
from tests.helpers import drain, one, spawn_worker, wait_for
from workers.rules.metadata import latest_start

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}


@pytest.fixture
def logins(admin_url: str) -> Iterator[dict[str, str]]:
    """A login in kc_worker, one in kc_operator and one with no grants, for this test."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "worker": f"kc_test_worker_{suffix}",
        "operator": f"kc_test_operator_{suffix}",
        "nobody": f"kc_test_nobody_{suffix}",
    }
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {names['worker']} LOGIN IN ROLE kc_worker")
        conn.execute(f"CREATE ROLE {names['operator']} LOGIN IN ROLE kc_operator")
        conn.execute(f"CREATE ROLE {names['nobody']} LOGIN")
    yield names
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f"DROP ROLE IF EXISTS {name}")


# -- connecting -------------------------------------------------------------------------------


def test_a_login_with_no_grants_cannot_connect(
    conn: Conn, db_url: str, logins: dict[str, str]
) -> None:
    """Issue 21, item 4: such a login held the migration's advisory lock (make run-workers
    then failed on its lock timeout), a trainer's lock and sent NOTIFY; it now gets no session
    at all, so it holds no lock of this database and sends it nothing."""
    assert "permission denied for database" in cannot_connect(as_user(db_url, logins["nobody"]))
    database = conn.info.dbname
    rights = conn.execute(
        "SELECT has_database_privilege('public', %(db)s, 'CONNECT') AS public_connect, "
        "has_database_privilege('public', %(db)s, 'TEMPORARY') AS public_temp, "
        "has_database_privilege('kc_worker', %(db)s, 'TEMPORARY') AS worker_temp, "
        "has_database_privilege('kc_operator', %(db)s, 'TEMPORARY') AS operator_temp",
        {"db": database},
    ).fetchone()
    assert rights is not None
    assert not any(rights.values()), rights
    # The project's roles connect, through their logins; none may make temporary tables.
    for name in ("worker", "operator"):
        url = as_user(db_url, logins[name])
        with psycopg.connect(url, autocommit=True) as member:
            assert member.execute("SELECT 1").fetchone() == (1,)
        assert refused(url, "CREATE TEMPORARY TABLE scratch (id int)")


def test_closing_the_database_keeps_who_was_let_in(
    conn: Conn, db_url: str, logins: dict[str, str], admin_url: str
) -> None:
    """The migration's function keeps CONNECT for the roles granted a right on the schema's
    objects (another system's login), takes it from everyone else, and says who may run it."""
    database = sql.Identifier(conn.info.dbname)
    service = f"kc_test_service_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {service} LOGIN")
    try:
        conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO PUBLIC").format(database))
        conn.execute(f"GRANT SELECT, INSERT ON payments TO {service}")
        # Only the database's owner or a superuser may close it.
        assert refused(
            as_user(db_url, logins["operator"]), "SELECT kc_limit_database_access()"
        )  # not even granted
        conn.execute("SELECT kc_limit_database_access()")
        with psycopg.connect(as_user(db_url, service), autocommit=True) as other:
            assert other.execute("SELECT count(*) FROM payments").fetchone() == (0,)
        assert cannot_connect(as_user(db_url, logins["nobody"]))
    finally:
        conn.execute(f"REVOKE ALL ON payments FROM {service}")
        conn.execute(
            sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(database, sql.Identifier(service))
        )
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE {service}")


# -- the audit trail and the sequences --------------------------------------------------------


def test_a_worker_adds_history_but_cannot_change_or_delete_it(
    conn: Conn, db_url: str, logins: dict[str, str]
) -> None:
    """Issue 21, item 7: kc_worker could DELETE from stage_history."""
    payment = f.payment(conn, f.student(conn), f.course(conn), GOOD)
    worker = as_user(db_url, logins["worker"])
    with psycopg.connect(worker, autocommit=True) as w:
        w.execute(
            "INSERT INTO stage_history (stage, ref_id, event) VALUES ('purchase', %s, 'skipped')",
            (payment,),
        )
    rows = one(conn, "SELECT count(*) AS n FROM stage_history WHERE ref_id = %s", payment)["n"]
    assert rows == 2  # the trigger's 'enqueued' and the worker's
    assert refused(worker, "DELETE FROM stage_history")
    assert refused(worker, "UPDATE stage_history SET detail = 'forged'")
    assert refused(worker, "TRUNCATE stage_history")
    # Pruning goes through the owner's function, which keeps at least a day.
    with psycopg.connect(worker, autocommit=True) as w:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="at least a day"):
            w.execute("SELECT * FROM prune_history('1 hour')")
        kept = w.execute("SELECT history_deleted FROM prune_history('30 days')").fetchone()
    assert kept == (0,)
    assert one(conn, "SELECT count(*) AS n FROM stage_history WHERE ref_id = %s", payment)["n"] == 2


def test_no_role_but_the_owner_sets_a_sequence(
    conn: Conn, db_url: str, logins: dict[str, str]
) -> None:
    """Issue 21, item 7: setval('stage_history_id_seq', 1) by a worker made every later
    enqueue fail, and with it the payment service's INSERT of a succeeded payment."""
    sequences = [
        r["name"]
        for r in conn.execute(
            "SELECT c.oid::regclass::text AS name FROM pg_class c "
            "WHERE c.relkind = 'S' AND c.relnamespace = 'public'::regnamespace ORDER BY 1"
        )
    ]
    assert "stage_history_id_seq" in sequences and "pgqueuer_id_seq" in sequences
    worker, operator = (as_user(db_url, logins[n]) for n in ("worker", "operator"))
    for name in sequences:
        assert refused(worker, "SELECT setval(%s::regclass, 1)", name), name
        assert refused(operator, "SELECT setval(%s::regclass, 1)", name), name
        assert refused(worker, f"ALTER SEQUENCE {name} RESTART")  # name: regclass, quoted
    # The worker still draws from them, and a sequence the owner makes later is no different.
    with psycopg.connect(worker, autocommit=True) as w:
        w.execute("SELECT nextval('stage_history_id_seq')")
    conn.execute("SET ROLE kc_owner")
    conn.execute("CREATE TABLE kc_test_later (id bigint GENERATED ALWAYS AS IDENTITY)")
    conn.execute("RESET ROLE")
    later = one(
        conn,
        "SELECT has_sequence_privilege('kc_worker', 'kc_test_later_id_seq', 'UPDATE') AS u, "
        "has_sequence_privilege('kc_worker', 'kc_test_later_id_seq', 'USAGE') AS usage",
    )
    assert later == {"u": False, "usage": True}
    # ... and payments go through.
    f.trainer(conn)
    f.payment(conn, f.student(conn), f.course(conn), GOOD)
    drain(db_url)
    assert one(conn, "SELECT count(*) AS n FROM tutoring_sessions")["n"] == 10


# -- NOTIFY -----------------------------------------------------------------------------------


def _event(kind: str, **fields: object) -> str:
    sent = datetime.now(UTC).isoformat()
    return json.dumps({"channel": "ch_pgqueuer", "sent_at": sent, "type": kind, **fields})


def _listening(conn: Conn) -> bool:
    """A worker's listening connection has run its LISTEN (it runs nothing else)."""
    row = one(
        conn,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'koding-caravan-listen' AND query LIKE 'LISTEN %%'",
    )
    return bool(row["n"])


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0


def test_a_worker_drops_notifications_the_pipeline_does_not_send(
    conn: Conn, db_url: str, logins: dict[str, str], tmp_path: Path
) -> None:
    """Issue 21, item 4: a malformed payload on ch_pgqueuer was logged at CRITICAL with a
    traceback, each time. Now each is one WARNING line, and work goes on."""
    log = tmp_path / "worker.log"
    worker = spawn_worker(as_user(db_url, logins["worker"]), log)
    payloads = [
        "not json at all",
        "{",
        json.dumps({"type": "table_changed_event"}),  # fields missing
        _event("made_up_event"),
        _event("cancellation_event", ids=[987654321]),  # a job that does not exist
        _event("table_changed_event", operation="insert", table="pgqueuer", channel="elsewhere"),
        "x" * 7000,
    ]
    try:
        wait_for(lambda: _listening(conn), 60, "the worker to listen")
        with psycopg.connect(as_user(db_url, logins["operator"]), autocommit=True) as sender:
            for payload in payloads:
                sender.execute("SELECT pg_notify('ch_pgqueuer', %s)", (payload,))
        f.trainer(conn)
        f.payment(conn, f.student(conn), f.course(conn), GOOD)
        wait_for(
            lambda: one(conn, "SELECT count(*) AS n FROM tutoring_sessions")["n"] == 10,
            60,
            "the payment's sessions",
        )
    finally:
        _stop(worker)
    text = log.read_text()
    warnings = [line for line in text.splitlines() if "ignored a NOTIFY on ch_pgqueuer" in line]
    assert len(warnings) == len(payloads), text
    assert all(" WARNING " in line for line in warnings), warnings
    assert all(len(line) < 600 for line in warnings)  # one line each, the payload cut short
    assert "CRITICAL" not in text and "Traceback" not in text, text
    assert "cancellation_event: nothing in the pipeline sends one" in text


def test_a_forged_cancellation_does_not_touch_a_job_in_flight(
    conn: Conn, db_url: str, logins: dict[str, str], tmp_path: Path
) -> None:
    """Issue 21, item 4: a cancellation_event naming a running job had it logged cancelled
    (and one that arrives before the job starts skips its work)."""
    log = tmp_path / "worker.log"
    worker = spawn_worker(as_user(db_url, logins["worker"]), log)
    course, student = f.course(conn), f.student(conn)
    f.trainer(conn)
    try:
        wait_for(lambda: _listening(conn), 60, "the worker to listen")
        # The purchase stage cannot write its row while this lock is held: its job stays in
        # flight.
        with psycopg.connect(db_url, autocommit=True) as holder, holder.transaction():
            holder.execute("LOCK TABLE student_course_purchases IN EXCLUSIVE MODE")
            f.payment(conn, student, course, GOOD)
            wait_for(
                lambda: (
                    one(
                        conn,
                        "SELECT count(*) AS n FROM pgqueuer "
                        "WHERE entrypoint = 'purchase' AND status = 'picked'",
                    )["n"]
                    == 1
                ),
                30,
                "the purchase job to be picked",
            )
            job = one(conn, "SELECT id FROM pgqueuer WHERE entrypoint = 'purchase'")["id"]
            with psycopg.connect(as_user(db_url, logins["operator"]), autocommit=True) as s:
                s.execute(
                    "SELECT pg_notify('ch_pgqueuer', %s)",
                    (_event("cancellation_event", ids=[job]),),
                )
            # Give the worker the time to hear it (it says so at once; on main it says nothing
            # and the job's end tells).
            with contextlib.suppress(AssertionError):
                wait_for(lambda: "cancellation_event" in log.read_text(), 30, "the warning")
        wait_for(
            lambda: one(conn, "SELECT count(*) AS n FROM tutoring_sessions")["n"] == 10,
            60,
            "the payment's sessions",
        )
    finally:
        _stop(worker)
    statuses = [
        r["status"]
        for r in conn.execute(
            "SELECT status::text FROM pgqueuer_log WHERE job_id = %s ORDER BY id", (job,)
        )
    ]
    assert statuses[-1] == "successful" and "canceled" not in statuses, statuses
    assert "ignored a NOTIFY on ch_pgqueuer" in log.read_text()


# -- reschedule -------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [date(9999, 12, 20), date(9999, 12, 31)])
def test_reschedule_refuses_a_start_more_than_a_year_ahead(
    conn: Conn, db_url: str, logins: dict[str, str], start: date
) -> None:
    """Issue 21, item 8: as kc_operator, '9999-12-20' cancelled 10 sessions and rewrote them
    for December 9999; '9999-12-31' left the request open and its job held failed."""
    student = f.student(conn)
    f.trainer(conn)
    f.payment(conn, student, f.course(conn), GOOD)
    drain(db_url)
    purchase = one(conn, "SELECT * FROM student_course_purchases")
    before = conn.execute(
        "SELECT id, scheduled_date, status FROM tutoring_sessions ORDER BY session_number"
    ).fetchall()
    today = one(conn, "SELECT (now() AT TIME ZONE 'Asia/Kolkata')::date AS d")["d"]
    latest = latest_start(today)
    assert today + timedelta(days=366) >= latest > today
    operator = as_user(db_url, logins["operator"])
    with (
        psycopg.connect(operator, autocommit=True) as op,
        pytest.raises(psycopg.errors.InvalidParameterValue) as refusal,
    ):
        op.execute("SELECT reschedule(%s, NULL, %s, NULL)", (purchase["id"], start))
    # metadata's sentence (workers/rules/metadata.py), about a reschedule's start date
    assert refusal.value.diag.message_primary == (
        f"start date {start} is more than a year ahead; the latest start accepted today is {latest}"
    )
    drain(db_url)
    assert one(conn, "SELECT * FROM student_course_purchases") == purchase
    after = conn.execute(
        "SELECT id, scheduled_date, status FROM tutoring_sessions ORDER BY session_number"
    ).fetchall()
    assert after == before
    assert one(conn, "SELECT count(*) AS n FROM schedule_changes")["n"] == 0
    assert one(conn, "SELECT count(*) AS n FROM pgqueuer")["n"] == 0  # nothing held failed
    # The last day the bound allows is accepted.
    with psycopg.connect(operator, autocommit=True) as op:
        op.execute("SELECT reschedule(%s, NULL, %s, NULL)", (purchase["id"], latest))
    assert one(conn, "SELECT to_start_date FROM schedule_changes")["to_start_date"] == latest


def test_a_login_that_may_not_act_as_its_part_is_told_at_once(db_url: str, admin_url: str) -> None:
    """Workers act as kc_worker and the operator commands as kc_operator, whatever the login;
    a login that is no member of the role is told so, with the fix, instead of retrying."""
    name = f"kc_test_owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN IN ROLE kc_owner")
    try:
        env = {**os.environ, "DATABASE_URL": as_user(db_url, name)}
        for command, role in (
            (["run", "--no-migrate", "--drain"], "kc_worker"),
            (["status"], "kc_operator"),
        ):
            done = subprocess.run(
                [sys.executable, "-m", "workers", *command],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 1, done.stderr
            assert f"the login {name} may not act as {role}" in done.stderr
            assert f"GRANT {role} TO {name}" in done.stderr and "Traceback" not in done.stderr
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE {name}")


# -- the app's own services (kc_app) ----------------------------------------------------------


def test_the_app_writes_its_tables_and_asks_for_moves_but_approves_nothing(
    conn: Conn, db_url: str, admin_url: str
) -> None:
    """Issue 24: kc_app may write the input tables, mark attendance, read what the pipeline
    decided and request (or withdraw) a move of one session; operators approve."""
    name = f"kc_test_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN IN ROLE kc_app")
    try:
        app = as_user(db_url, name)
        course = f.course(conn)
        f.trainer(conn)
        with psycopg.connect(app, autocommit=True) as a:
            student = a.execute(
                "INSERT INTO students (full_name, home_lat, home_lng) "
                "VALUES ('Asha', %s, %s) RETURNING id",
                f.HOME,
            ).fetchone()
            assert student is not None
            a.execute(
                "INSERT INTO payments (student_id, course_id, amount_cents, status, metadata) "
                "VALUES (%s, %s, 100, 'succeeded', %s::jsonb)",
                (student[0], course, json.dumps({**GOOD, "startDate": "2027-03-01"})),
            )
        drain(db_url)
        first, second = (
            r["id"]
            for r in conn.execute(
                "SELECT id FROM tutoring_sessions WHERE session_number IN (1, 2) "
                "ORDER BY session_number"
            )
        )
        with psycopg.connect(app, autocommit=True) as a:
            asked = a.execute(
                "SELECT request_session_move(%s, '2027-03-20', '10:00', 'student', 'exam')",
                (first,),
            ).fetchone()
            assert asked is not None
            a.execute("SELECT cancel_session_move(%s)", (asked[0],))
            again = a.execute(
                "SELECT request_session_move(%s, '2027-03-20', '10:00', 'trainer', 'ill')",
                (first,),
            ).fetchone()
            assert again is not None
            # Attendance, as the app marks it today.
            a.execute("UPDATE tutoring_sessions SET status = 'cancelled' WHERE id = %s", (second,))
        request = again[0]
        assert refused(app, "SELECT approve_session_move(%s)", request)
        assert refused(app, "SELECT reject_session_move(%s, 'no')", request)
        assert refused(
            app,
            "SELECT request_session_move(%s, '2027-03-21', '10:00', 'operator', 'x')",
            first,
        )
        assert refused(app, "UPDATE trainer_reschedules SET status = 'approved'")
        assert refused(
            app, "UPDATE tutoring_sessions SET scheduled_date = '2027-03-22' WHERE id = %s", first
        )
        assert refused(app, "UPDATE trainer_allocations SET status = 'cancelled'")
        assert refused(app, "SELECT enqueue_stage('allocation', %s)", request)
        assert refused(app, "SELECT replay_stage('purchase', %s)", request)
        assert refused(app, "SELECT * FROM stage_history")
        assert refused(app, "UPDATE kc_settings SET moves_auto_approve = true")
        rows = conn.execute(
            "SELECT status, request_type, requested_by, reviewed_by FROM trainer_reschedules "
            "ORDER BY created_at"
        ).fetchall()
        assert rows == [
            {
                "status": "cancelled",
                "request_type": "student",
                "requested_by": name,
                "reviewed_by": name,
            },
            {
                "status": "pending",
                "request_type": "trainer",
                "requested_by": name,
                "reviewed_by": None,
            },
        ]
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {name}")
            admin.execute(f"DROP ROLE {name}")
