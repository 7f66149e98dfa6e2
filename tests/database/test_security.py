"""Inputs the database functions and the admin requests must refuse, and bad rows that must
end at once instead of looping (issue 10). Privileges per role are in test_roles.py."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import drain, one
from workers.settings import REPO_ROOT

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "5:00 PM", "scheduleMode": "daily"}


def _approved(conn: Conn, db_url: str) -> tuple[UUID, UUID, UUID]:
    """A purchase approved with one trainer; returns (payment, purchase, student)."""
    course = f.course(conn)
    f.trainer(conn, name="First", rating=4.9)
    student = f.student(conn)
    payment = f.payment(conn, student, course, GOOD)
    drain(db_url)
    purchase = one(conn, "SELECT id FROM student_course_purchases")["id"]
    return payment, purchase, student


def _request(conn: Conn, request: int) -> DictRow:
    return one(conn, "SELECT status, outcome FROM allocation_requests WHERE id = %s", request)


def _live(conn: Conn, purchase: UUID) -> DictRow:
    return one(
        conn,
        "SELECT * FROM trainer_allocations WHERE purchase_id = %s "
        "AND status IN ('pending', 'approved')",
        purchase,
    )


# -- the functions check what they are given ------------------------------------------------


def test_apply_refund_only_for_a_refunded_payment(conn: Conn, db_url: str) -> None:
    payment, purchase, _ = _approved(conn, db_url)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="not refunded"):
        conn.execute("SELECT apply_refund(%s)", (payment,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="missing"):
        conn.execute("SELECT apply_refund(%s)", (uuid.uuid4(),))
    assert _live(conn, purchase)["status"] == "approved"
    assert (
        one(conn, "SELECT count(*) AS n FROM tutoring_sessions WHERE status = 'scheduled'")["n"]
        == 10
    )


def test_enqueue_refuses_unknown_rows_events_and_long_delays(conn: Conn) -> None:
    payment = f.payment(conn, f.student(conn), f.course(conn), GOOD, status="initiated")
    with pytest.raises(psycopg.errors.NoDataFound, match="no row"):
        conn.execute("SELECT enqueue_stage('sessions', %s)", (uuid.uuid4(),))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="not an enqueue event"):
        conn.execute("SELECT enqueue_stage('purchase', %s, 'succeeded')", (payment,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"outside 0 \.\. 1 day"):
        conn.execute("SELECT enqueue_stage('purchase', %s, 'enqueued', '100 years')", (payment,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"outside 0 \.\. 1 day"):
        conn.execute("SELECT enqueue_stage('purchase', %s, 'enqueued', '-1 hour')", (payment,))
    assert f.queued_jobs(conn) == []
    assert one(conn, "SELECT count(*) AS n FROM stage_history")["n"] == 0


def test_replay_wakes_a_job_parked_in_the_future(conn: Conn, db_url: str) -> None:
    payment = f.payment(conn, f.student(conn), f.course(conn), GOOD, status="initiated")
    conn.execute("SELECT enqueue_stage('purchase', %s, 'enqueued', '1 day')", (payment,))
    # The payment succeeds: its trigger's enqueue dedupes onto the parked job.
    conn.execute("UPDATE payments SET status = 'succeeded' WHERE id = %s", (payment,))
    parked = one(
        conn, "SELECT id, execute_after > now() + interval '1 hour' AS later FROM pgqueuer"
    )
    assert parked["later"]
    conn.execute("SELECT replay_stage('purchase', %s)", (payment,))
    job = one(conn, "SELECT id, execute_after <= now() AS due FROM pgqueuer")
    assert job == {"id": parked["id"], "due": True}
    drain(db_url)
    assert one(conn, "SELECT count(*) AS n FROM student_course_purchases")["n"] == 1


def test_foreign_jobs_are_ignored_by_the_views_and_the_healer(conn: Conn, db_url: str) -> None:
    payment, _, _ = _approved(conn, db_url)
    conn.execute(
        "INSERT INTO pgqueuer (priority, entrypoint, payload, dedupe_key, status) VALUES "
        "(0, 'welcome_mail', 'x', 'welcome-mail-42', 'queued'), "
        "(0, 'purchase', 'x', 'purchase:not-a-uuid', 'failed')"
    )
    conn.execute("UPDATE payments SET updated_at = now() - interval '1 hour'")
    assert conn.execute("SELECT * FROM heal_pipeline('1 minute')").fetchall() == []
    assert conn.execute("SELECT * FROM stage_jobs").fetchall() == []
    assert conn.execute("SELECT * FROM live_jobs").fetchall() == []
    assert conn.execute("SELECT * FROM failed_jobs").fetchall() == []
    trace = one(conn, "SELECT purchase_job FROM purchase_trace WHERE payment_id = %s", payment)
    assert trace["purchase_job"] is None


# -- admin requests ---------------------------------------------------------------------------


def test_override_sets_aside_only_what_it_may_and_records_every_rule(
    conn: Conn, db_url: str
) -> None:
    _, purchase, student = _approved(conn, db_url)
    # Teaches another subject, lives far away, and only works 20:00-22:00: the override may
    # set aside the first two, never availability.
    evening = f.trainer(
        conn, name="Evening", specialties=("Painting",), lat=f.HOME[0] + 1, slot=("20:00", "22:00")
    )
    request = one(
        conn, "SELECT assign_trainer(%s, %s, true, 'parent asked') AS id", purchase, evening
    )["id"]
    drain(db_url)
    refused = _request(conn, request)
    assert refused["status"] == "refused"
    assert "no_free_slot" in refused["outcome"] and "available at 17:00" in refused["outcome"]
    assert _live(conn, purchase)["trainer_id"] != evening

    # The same trainer available at 17:00: now every failing rule is one an override may set
    # aside, and each is recorded.
    conn.execute(
        "UPDATE trainer_availability SET slot_start = '08:00' WHERE trainer_id = %s", (evening,)
    )
    request = one(
        conn, "SELECT assign_trainer(%s, %s, true, 'parent asked') AS id", purchase, evening
    )["id"]
    drain(db_url)
    assert _request(conn, request)["status"] == "done"
    allocation = _live(conn, purchase)
    assert allocation["trainer_id"] == evening
    assignment = allocation["metadata"]["assignment"]
    assert assignment["overriddenRules"] == ["no_specialty", "out_of_range"]
    assert assignment["overriddenRule"] == "no_specialty"
    assert (
        one(
            conn,
            "SELECT count(*) AS n FROM tutoring_sessions WHERE trainer_id = %s "
            "AND status = 'scheduled'",
            evening,
        )["n"]
        == 10
    )
    assert (
        one(conn, "SELECT student_id FROM trainer_allocations WHERE id = %s", allocation["id"])[
            "student_id"
        ]
        == student
    )


def test_override_past_capacity_and_specialty_is_approved(conn: Conn, db_url: str) -> None:
    _, purchase, _ = _approved(conn, db_url)
    # Capacity 4 (no rating), already full with four other students' allocations.
    busy = f.trainer(conn, name="Busy", specialties=("Painting",), rating=None)
    painting = f.course(conn, category="Painting", subcategory=None, title="Painting")
    for hour in (8, 10, 12, 14):
        f.payment(conn, f.student(conn), painting, {**GOOD, "timeSlot": f"{hour}:00"})
    drain(db_url)
    assert (
        one(
            conn,
            "SELECT count(*) AS n FROM trainer_allocations WHERE trainer_id = %s "
            "AND status = 'approved'",
            busy,
        )["n"]
        == 4
    )
    request = one(conn, "SELECT assign_trainer(%s, %s, true, 'exception') AS id", purchase, busy)[
        "id"
    ]
    drain(db_url)
    assert _request(conn, request)["status"] == "done"
    allocation = _live(conn, purchase)
    assert allocation["trainer_id"] == busy and allocation["capacity_override"]
    assert allocation["metadata"]["assignment"]["overriddenRules"] == [
        "no_specialty",
        "at_capacity",
    ]
    assert conn.execute("SELECT * FROM failed_jobs").fetchall() == []


def test_capacity_override_needs_an_admin_request(conn: Conn, db_url: str) -> None:
    _, purchase, _ = _approved(conn, db_url)
    other = f.trainer(conn, name="Other")
    allocation = _live(conn, purchase)
    with pytest.raises(psycopg.errors.CheckViolation, match="without an open override request"):
        conn.execute(
            "UPDATE trainer_allocations SET trainer_id = %s, capacity_override = true "
            "WHERE id = %s",
            (other, allocation["id"]),
        )
    with pytest.raises(psycopg.errors.CheckViolation, match="without an open override request"):
        conn.execute(
            "INSERT INTO trainer_allocations (purchase_id, student_id, course_id, trainer_id, "
            "status, first_session_date, allocated_at, capacity_override) "
            "SELECT purchase_id, student_id, course_id, %s, 'approved', first_session_date, "
            "now(), true FROM trainer_allocations WHERE id = %s",
            (other, allocation["id"]),
        )


def test_a_database_refusal_closes_the_request_with_its_reason(conn: Conn, db_url: str) -> None:
    _, purchase, _ = _approved(conn, db_url)
    other = f.trainer(conn, name="Other")
    # A rule this project does not know, enforced by the database: the request must end
    # refused with the database's words, not retried and held as a failed job.
    conn.execute(
        "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'trainer on leave' USING ERRCODE = 'check_violation'; END $$"
    )
    conn.execute(
        "CREATE TRIGGER test_refuse BEFORE INSERT ON trainer_allocations FOR EACH ROW "
        f"WHEN (NEW.trainer_id = '{other}') EXECUTE FUNCTION test_refuse()"
    )
    request = one(conn, "SELECT assign_trainer(%s, %s) AS id", purchase, other)["id"]
    drain(db_url)
    outcome = _request(conn, request)
    assert outcome == {"status": "refused", "outcome": "refused by the database: trainer on leave"}
    assert _live(conn, purchase)["trainer_id"] != other
    assert (
        one(conn, "SELECT count(*) AS n FROM tutoring_sessions WHERE status = 'scheduled'")["n"]
        == 10
    )
    assert conn.execute("SELECT * FROM failed_jobs").fetchall() == []


def test_a_newer_request_supersedes_an_open_one(conn: Conn, db_url: str) -> None:
    _, purchase, _ = _approved(conn, db_url)
    second = f.trainer(conn, name="Second")
    third = f.trainer(conn, name="Third")
    first_request = one(conn, "SELECT assign_trainer(%s, %s) AS id", purchase, second)["id"]
    newer = one(conn, "SELECT assign_trainer(%s, %s) AS id", purchase, third)["id"]
    assert _request(conn, first_request) == {
        "status": "superseded",
        "outcome": f"superseded by request {newer}",
    }
    drain(db_url)
    assert _request(conn, newer)["status"] == "done"
    assert _live(conn, purchase)["trainer_id"] == third
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO allocation_requests (purchase_id, trainer_id) VALUES (%s, %s), (%s, %s)",
            (purchase, second, purchase, third),
        )


# -- a row no retry can fix ends at once ------------------------------------------------------


def test_a_time_zone_broken_after_purchase_fails_once_and_is_not_retried(
    conn: Conn, db_url: str
) -> None:
    course = f.course(conn)
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)  # no trainer: the purchase waits
    purchase = one(conn, "SELECT id FROM student_course_purchases")["id"]
    assert _live(conn, purchase)["status"] == "pending"
    conn.execute("UPDATE students SET timezone = 'Mars/Base' WHERE id = %s", (student,))
    f.trainer(conn)  # the retry trigger enqueues the purchase again
    drain(db_url)
    failed = conn.execute("SELECT stage, ref_id, attempts, error FROM failed_jobs").fetchall()
    assert len(failed) == 1
    assert failed[0]["ref_id"] == purchase and failed[0]["attempts"] == 1
    assert "'Mars/Base' is not an IANA time zone" in failed[0]["error"]
    # Neither the sweep nor the retry triggers enqueue a twin beside the held job.
    assert one(conn, "SELECT sweep_pending_allocations('0 seconds') AS n")["n"] == 0
    f.trainer(conn, name="Another")
    assert [j["status"] for j in f.queued_jobs(conn)] == ["failed"]
    # Once the row is corrected, the operator's replay finishes the job.
    conn.execute("UPDATE students SET timezone = 'Asia/Kolkata' WHERE id = %s", (student,))
    conn.execute("SELECT replay_stage('allocation', %s)", (purchase,))
    drain(db_url)
    assert _live(conn, purchase)["status"] == "approved"


# -- what an operator types -------------------------------------------------------------------


def test_make_variables_cannot_run_commands(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for args in (
        [f"ID=00000000-0000-0000-0000-000000000000; touch {marker}", "trace"],
        [f"STAGE=purchase --failed; touch {marker} #", "replay"],
        [f"WORKERS=1; touch {marker}", "-n", "run-workers"],
    ):
        subprocess.run(
            ["make", "-s", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert not marker.exists(), args


# Issue 21, item 11: GNU make expanded a command-line variable when it exported it to a
# recipe's environment (so `make trace ID='$(shell ...)'` ran the command, and so did any
# NAME='$(shell ...)'), and pasted PSQL_ARGS and PYTEST_ARGS into the recipe's shell text.
HOSTILE = [
    ("trace", "ID", "$(shell touch {marker})"),
    ("trace", "FOO", "$(shell touch {marker})"),  # a variable no recipe mentions
    ("status", "SHELLFLAGS", "`touch {marker}`"),
    ("psql", "PSQL_ARGS", "-c 'select 1'; touch {marker}"),
    ("psql", "PSQL_ARGS", "$(touch {marker})"),
    ("psql", "PSQL_ARGS", "$(shell touch {marker})"),
    (
        "test",
        "PYTEST_ARGS",
        "--collect-only -q tests/database/test_lifecycle_rules.py; touch {marker}",
    ),
    ("test", "PYTEST_ARGS", "$(shell touch {marker})"),
    ("-n bench", "QUICK", "$(shell touch {marker})"),
    ("-n run-workers", "WORKERS", "$(shell touch {marker})"),
    ("move-reject", "REASON", "$(touch {marker})"),
    ("move-request", "TIME", "`touch {marker}`"),
    ("leave", "REASON", "$(touch {marker})"),
    ("leave-approve", "ID", "1; touch {marker}"),
    ("substitute", "SESSION", "$(touch {marker})"),
]


@pytest.mark.parametrize(("target", "name", "value"), HOSTILE)
def test_make_passes_values_as_data(tmp_path: Path, target: str, name: str, value: str) -> None:
    marker = tmp_path / "ran"
    env = {**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing"}
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(REPO_ROOT),
            *target.split(),
            f"{name}={value.format(marker=marker)}",
        ],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert not marker.exists()


def test_psql_args_arrive_as_the_words_they_say(tmp_path: Path) -> None:
    """PSQL_ARGS is split as a shell splits words (quotes group), nothing more."""
    fake = tmp_path / "psql"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
    fake.chmod(0o755)
    result = subprocess.run(
        ["make", "-s", "-C", str(REPO_ROOT), "psql", "PSQL_ARGS=-c 'select $$1, $(x)' -X"],
        env={
            **os.environ,
            "PATH": f"{tmp_path}:{os.environ['PATH']}",
            "DATABASE_URL": "postgresql://alice@db.example:5433/koding",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines()[1:] == ["[-c]", "[select $$1, $(x)]", "[-X]"]


def test_psql_gets_the_password_from_its_environment(tmp_path: Path) -> None:
    fake = tmp_path / "psql"
    fake.write_text('#!/bin/sh\necho "ARGS $*"\necho "PGPASSWORD=$PGPASSWORD"\n')
    fake.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-m", "workers", "psql", "--", "-c", "select 1"],
        env={
            **os.environ,
            "PATH": f"{tmp_path}:{os.environ['PATH']}",
            "DATABASE_URL": "postgresql://alice:s3cret@db.example:5433/koding",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    args_line, password_line = result.stdout.splitlines()
    assert "s3cret" not in args_line
    assert "host=db.example" in args_line and "user=alice" in args_line
    assert args_line.endswith("-c select 1")
    assert password_line == "PGPASSWORD=s3cret"
