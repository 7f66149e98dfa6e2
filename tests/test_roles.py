"""Least privilege: a worker role runs the pipeline and nothing else; an operator role reads
everything and replays, but cannot change a table or the schema."""

from __future__ import annotations

import os
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

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@pytest.fixture
def login(admin_url: str) -> Iterator[dict[str, str]]:
    """Two login roles for this test: one in kc_worker, one in kc_operator."""
    suffix = uuid.uuid4().hex[:8]
    names = {"worker": f"kc_test_worker_{suffix}", "operator": f"kc_test_operator_{suffix}"}
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {names['worker']} LOGIN IN ROLE kc_worker")
        conn.execute(f"CREATE ROLE {names['operator']} LOGIN IN ROLE kc_operator")
    yield names
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f"DROP ROLE IF EXISTS {name}")


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
        r["event"]
        for r in conn.execute(
            "SELECT event FROM stage_history WHERE ref_id = %s ORDER BY id", (payment,)
        )
    ]
    assert events == ["enqueued", "replayed"]

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
