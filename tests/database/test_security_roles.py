"""Least privilege: a worker role runs the pipeline and nothing else; an operator role reads
everything and replays, but cannot change a table or the schema."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.rows import DictRow, dict_row

from tests import factories as f
from tests.helpers import drain

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@pytest.fixture
def login(admin_url: str) -> Iterator[dict[str, str]]:
    """Login roles for this test: one in kc_worker, one in kc_operator, one with no grants."""
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


def cannot_connect(url: str) -> str:
    """The server's refusal of a login that may not connect to the database ('' if it may)."""
    try:
        psycopg.connect(url, autocommit=True).close()
    except psycopg.OperationalError as exc:
        assert "User does not have CONNECT privilege" in str(exc), exc
        return str(exc)
    return ""


def refused(url: str, sql: str, *params: object) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            conn.execute(sql, params or None)
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


def test_worker_role_runs_the_pipeline_and_nothing_more(
    conn: Conn, db_url: str, login: dict[str, str], tmp_path: Path
) -> None:
    worker_url = as_user(db_url, login["worker"])
    course = f.course(conn)
    trainer = f.trainer(conn)
    payment = f.payment(conn, f.student(conn), course, GOOD)
    log = tmp_path / "worker.log"
    with open(log, "ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "run", "--single", "--no-migrate"],
            env={**os.environ, "DATABASE_URL": worker_url},
            stdout=sink,
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) AS n FROM tutoring_sessions").fetchone()
            if row and row["n"] == 10:
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        else:
            raise AssertionError(log.read_text()[-3000:])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert conn.execute("SELECT * FROM failed_jobs").fetchall() == []

    assert refused(worker_url, "CREATE TABLE scratch (id int)")
    assert refused(worker_url, "DROP TABLE payments")
    assert refused(worker_url, "ALTER TABLE payments DISABLE TRIGGER payments_touch")
    assert refused(worker_url, "DELETE FROM payments")
    assert refused(worker_url, "UPDATE payments SET status = 'refunded' WHERE id = %s", payment)
    assert refused(worker_url, "UPDATE trainers SET status = 'inactive' WHERE id = %s", trainer)
    assert refused(worker_url, "SELECT replay_stage('purchase', %s)", payment)


def test_operator_role_reads_and_replays_but_changes_nothing(
    conn: Conn, db_url: str, login: dict[str, str]
) -> None:
    operator_url = as_user(db_url, login["operator"])
    course = f.course(conn)
    f.trainer(conn)
    payment = f.payment(conn, f.student(conn), course, GOOD)
    with psycopg.connect(operator_url, autocommit=True, row_factory=dict_row) as op:
        assert op.execute("SELECT payment_id FROM purchase_trace").fetchall() == [
            {"payment_id": payment}
        ]
        op.execute("SELECT * FROM stage_overview").fetchall()
        op.execute("SELECT * FROM failed_jobs").fetchall()
        op.execute("SELECT * FROM stuck_rows('1 minute')").fetchall()
        job = op.execute("SELECT replay_stage('purchase', %s) AS job", (payment,)).fetchone()
        assert job is not None and job["job"] is not None
    events = [
        (r["event"], r["actor"])
        for r in conn.execute(
            "SELECT event, actor FROM stage_history WHERE ref_id = %s ORDER BY id", (payment,)
        )
    ]
    # The replay names who asked: without an actor, the operator's own login.
    assert events == [("enqueued", None), ("replayed", login["operator"])]

    assert refused(operator_url, "INSERT INTO holidays VALUES ('2030-01-01', 'x')")
    assert refused(operator_url, "UPDATE payments SET status = 'refunded' WHERE id = %s", payment)
    assert refused(operator_url, "DELETE FROM pgqueuer")
    assert refused(
        operator_url,
        "INSERT INTO stage_history (stage, ref_id, event) VALUES ('purchase', %s, 'succeeded')",
        payment,
    )
    assert refused(operator_url, "CREATE TABLE scratch (id int)")
    assert refused(operator_url, "DROP VIEW purchase_trace")


def test_no_security_definer_function_is_open_to_public(conn: Conn) -> None:
    """Functions that run with the owner's rights are granted to a role, never to PUBLIC, and
    pin their search_path (this fails for any such function a later migration adds)."""
    rows = conn.execute(
        "SELECT p.oid::regprocedure::text AS fn, "
        "       has_function_privilege('public', p.oid, 'EXECUTE') AS public_may, "
        "       coalesce(array_to_string(p.proconfig, ','), '') AS config "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'public' AND p.prosecdef"
    ).fetchall()
    assert len(rows) >= 10  # the replays, assignment, enqueue, refund, retries, triggers
    assert [r["fn"] for r in rows if r["public_may"]] == []
    assert [r["fn"] for r in rows if "search_path=" not in r["config"]] == []


def test_each_role_may_run_only_its_functions(
    conn: Conn, db_url: str, login: dict[str, str]
) -> None:
    course = f.course(conn)
    f.trainer(conn)
    payment = f.payment(conn, f.student(conn), course, GOOD)
    drain(db_url)
    purchase = conn.execute("SELECT id FROM student_course_purchases").fetchone()
    assert purchase is not None
    before = conn.execute(
        "SELECT (SELECT count(*) FROM tutoring_sessions WHERE status = 'scheduled') AS s, "
        "(SELECT count(*) FROM pgqueuer) AS jobs, (SELECT count(*) FROM stage_history) AS h"
    ).fetchone()

    # A login with no grants does not get as far as a statement
    # (tests/database/test_security_access.py).
    assert cannot_connect(as_user(db_url, login["nobody"]))
    url = as_user(db_url, login["operator"])
    assert refused(url, "SELECT apply_refund(%s)", payment)
    assert refused(url, "SELECT enqueue_stage('purchase', %s, 'succeeded')", payment)
    assert refused(url, "SELECT enqueue_stage('sessions', %s)", uuid.uuid4())
    assert refused(url, "SELECT retry_pending_allocations(NULL)")
    assert refused(url, "SELECT kc_retry_pending(NULL)")
    assert refused(url, "SELECT kc_job_priority('allocation', %s, 'enqueued')", payment)
    assert refused(url, "SELECT kc_apply_refund_unchecked(%s)", payment)
    assert refused(url, "SELECT sweep_pending_allocations('0 seconds')")
    assert refused(url, "SELECT * FROM heal_pipeline('0 seconds')")
    # What the operator functions call inside: only through them, as the owner.
    assert refused(url, "SELECT kc_replay_stage('purchase', %s)", payment)
    assert refused(url, "SELECT kc_assign_trainer(%s, %s)", purchase["id"], uuid.uuid4())
    assert refused(url, "SELECT kc_reschedule(%s, '6 PM')", purchase["id"])
    assert refused(url, "SELECT kc_begin_acting('console:someone')")
    assert refused(url, "SELECT kc_operator_actor(NULL)")
    assert refused(url, "SELECT * FROM console_operator_add('Mallory', %s)", "m" * 43)
    assert refused(url, "SELECT console_operator_revoke('Priya')")
    # Tokens' and sessions' hashes, and who is acting, are the owner's to read.
    assert refused(url, "SELECT * FROM console_operators")
    assert refused(url, "SELECT * FROM console_sessions")
    assert refused(url, "SELECT * FROM kc_acting")
    # Nothing changed: the purchase and its sessions stand, no job or history was added.
    after = conn.execute(
        "SELECT (SELECT count(*) FROM tutoring_sessions WHERE status = 'scheduled') AS s, "
        "(SELECT count(*) FROM pgqueuer) AS jobs, (SELECT count(*) FROM stage_history) AS h"
    ).fetchone()
    assert after == before and before is not None and before["s"] == 10
    assert conn.execute(
        "SELECT is_active FROM student_course_purchases WHERE payment_id = %s", (payment,)
    ).fetchone() == {"is_active": True}


def test_a_writer_of_payments_starts_and_refunds_without_rights_on_the_queue(
    conn: Conn, db_url: str, admin_url: str
) -> None:
    """The payment service needs rights on payments only: the triggers run as the owner."""
    name = f"kc_test_payments_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN")
    database = conn.info.dbname
    try:
        # Another system's login: CONNECT on the database and rights on payments, nothing more.
        conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {name}')
        conn.execute(f"GRANT SELECT, INSERT, UPDATE ON payments TO {name}")
        course = f.course(conn)
        f.trainer(conn)
        student = f.student(conn)
        service = as_user(db_url, name)
        with psycopg.connect(service, autocommit=True, row_factory=dict_row) as pay:
            row = pay.execute(
                "INSERT INTO payments (student_id, course_id, amount_cents, status, metadata) "
                "VALUES (%s, %s, 100, 'succeeded', %s::jsonb) RETURNING id",
                (student, course, '{"sessionCount": 10}'),
            ).fetchone()
            assert row is not None
            drain(db_url)
            assert conn.execute("SELECT count(*) AS n FROM tutoring_sessions").fetchone() == {
                "n": 10
            }
            assert refused(service, "SELECT enqueue_stage('purchase', %s)", row["id"])
            pay.execute("UPDATE payments SET status = 'refunded' WHERE id = %s", (row["id"],))
        assert conn.execute(
            "SELECT count(*) AS n FROM tutoring_sessions WHERE status = 'scheduled'"
        ).fetchone() == {"n": 0}
    finally:
        conn.execute(f"REVOKE ALL ON payments FROM {name}")
        conn.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM {name}')
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE IF EXISTS {name}")


def test_every_object_belongs_to_the_owner_role(conn: Conn) -> None:
    """Migrations after 0005 run as kc_owner, even when one run takes a fresh database from
    nothing to head (sql/migrations/before_each.sql)."""
    strays = conn.execute(
        "SELECT c.relname AS name, c.relowner::regrole::text AS owner FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'm', 'p') "
        "AND c.relowner <> 'kc_owner'::regrole "
        "UNION ALL SELECT p.oid::regprocedure::text, p.proowner::regrole::text FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'public' AND p.proowner <> 'kc_owner'::regrole"
    ).fetchall()
    assert strays == []


def test_no_session_decides_the_actor_of_an_event(
    conn: Conn, db_url: str, login: dict[str, str]
) -> None:
    """The actor of an event is decided by the database: a worker that sets kc.actor (or
    kc.acting, or names the column) writes no name; an operator's name comes from a console
    session the database checks, or is the login; requested_by cannot be rewritten."""
    course = f.course(conn)
    trainer = f.trainer(conn)
    payment = f.payment(conn, f.student(conn), course, GOOD)
    drain(db_url)
    purchase = conn.execute("SELECT id FROM student_course_purchases").fetchone()
    assert purchase is not None
    conn.execute("SELECT assign_trainer(%s, %s)", (purchase["id"], trainer))
    conn.execute("SELECT reschedule(%s, '6 PM')", (purchase["id"],))

    worker = as_user(db_url, login["worker"])
    with psycopg.connect(worker, autocommit=True, row_factory=dict_row) as w:
        w.execute("SET kc.actor = 'console:Mallory'")
        w.execute("SET kc.acting = 'on'")
        written = [
            w.execute(
                "INSERT INTO stage_history (stage, ref_id, event) "
                "VALUES ('purchase', %s, 'succeeded') RETURNING actor",
                (payment,),
            ).fetchone(),
            w.execute(
                "INSERT INTO stage_history (stage, ref_id, event, actor) "
                "VALUES ('purchase', %s, 'succeeded', 'console:Priya') RETURNING actor",
                (payment,),
            ).fetchone(),
        ]
        assert written == [{"actor": None}, {"actor": None}]
        for table in ("allocation_requests", "schedule_changes"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="requested_by"):
                w.execute(f"UPDATE {table} SET requested_by = 'console:Mallory'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            w.execute("INSERT INTO kc_acting VALUES (pg_backend_pid(), 'console:Mallory')")

    operator = as_user(db_url, login["operator"])
    token = secrets.token_urlsafe(32)
    conn.execute("SELECT * FROM console_operator_add('Priya', %s)", (token,))
    session = secrets.token_urlsafe(32)
    with psycopg.connect(operator, autocommit=True, row_factory=dict_row) as op:
        op.execute("SET kc.actor = 'console:Mallory'")
        # A name where the session id goes is no session.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed in"):
            op.execute("SELECT replay_stage('purchase', %s, 'console:Priya')", (payment,))
        op.execute("SELECT replay_stage('purchase', %s)", (payment,))  # the login
        signed = op.execute(
            "SELECT operator FROM console_sign_in(%s, %s, 'test')", (token, session)
        ).fetchone()
        assert signed == {"operator": "Priya"}
        op.execute("SELECT replay_stage('purchase', %s, %s)", (payment, session))
        conn.execute("SELECT console_operator_revoke('Priya')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed in"):
            op.execute("SELECT replay_stage('purchase', %s, %s)", (payment, session))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not signed in"):
            op.execute("SELECT reschedule(%s, '7 PM', NULL, NULL, %s)", (purchase["id"], session))

    replays = [
        r["actor"]
        for r in conn.execute(
            "SELECT actor FROM stage_history WHERE event = 'replayed' ORDER BY id"
        )
    ]
    assert replays == [login["operator"], "console:Priya"]
    everyone = {r["actor"] for r in conn.execute("SELECT DISTINCT actor FROM stage_history")}
    assert "console:Mallory" not in everyone
    admin = conn.execute("SELECT session_user AS login").fetchone()
    assert admin is not None
    asked = conn.execute(
        "SELECT requested_by FROM allocation_requests UNION ALL "
        "SELECT requested_by FROM schedule_changes"
    ).fetchall()
    assert asked == [{"requested_by": admin["login"]}] * 2
    assert conn.execute("SELECT count(*) AS n FROM kc_acting").fetchone() == {"n": 0}
