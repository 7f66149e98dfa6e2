"""Fuzz: malformed payments (wrong types, huge strings, unknown modes, unicode, NUL bytes,
SQL-looking text, malformed rows, deep nesting, oversized payloads, far dates, Unicode digits,
every alias at the top level and inside `schedule`, hybrid, group sizes and trainer ids)
are each refused by the database or rejected by the pipeline with a reason; the worker never
crashes and good payments in the same batch go through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import DictRow

from tests import factories as f
from workers.rules.metadata import SCHEDULE_NAMES, TOP_LEVEL_NAMES

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "weekdays"}

nasty_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30),
    st.just("'; DROP TABLE payments; --"),
    st.just("16:00\x00"),
    st.just("x" * 20_000),
    st.just("\u202e4:00 PM"),
    st.just("\u096a:\u0966\u0966 PM"),  # Devanagari digits
    st.sampled_from(["weekly", "Sunday", "sunday-only", "DAILY ", "", " "]),
)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    nasty_text,
    st.floats(allow_nan=False, allow_infinity=False),
)
unicode_digits = st.text(alphabet=st.characters(categories=["Nd"]), min_size=1, max_size=4)
far_dates = st.dates().map(date.isoformat)  # year 1 .. 9999
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nasty_text, inner, max_size=3),
    max_leaves=8,
)


def nested(depth: int) -> Any:
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"x": value}
    return value


json_value = st.one_of(
    json_value,
    unicode_digits,
    unicode_digits.map(lambda d: f"{d}:{d} PM"),
    far_dates,
    st.integers(min_value=5, max_value=300).map(nested),  # past the depth limit, and not
    st.just("x" * 70_000),  # past the size limit
)
# Every name the pipeline reads (issue 11: aliases, learningMode, groupSize, trainerId), at the
# top level and inside `schedule`, plus values the app really sends for the new fields.
KEYS = sorted(TOP_LEVEL_NAMES - {"schedule"})
app_value = st.one_of(
    json_value,
    st.sampled_from(["hybrid", "home", "HYBRID", "everyday", "SUNDAY_ONLY", "WEEKDAY_DAILY"]),
    st.sampled_from([1, 2, 3, "2", 30, "30", 0, 4]),
    st.uuids().map(str),
)
schedule_object = st.dictionaries(st.sampled_from(sorted(SCHEDULE_NAMES)), app_value, max_size=4)
bad_metadata = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), app_value, max_size=6),
    st.fixed_dictionaries({}, optional={k: app_value for k in KEYS}).map(lambda d: {**GOOD, **d}),
    st.fixed_dictionaries({"schedule": st.one_of(schedule_object, json_value)}).map(
        lambda d: {**GOOD, **d}
    ),
    json_value,  # not even an object
)


@pytest.fixture
def worker(db_url: str, conn: Conn, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path / "worker.log"
    env = {**os.environ, "DATABASE_URL": db_url, "KC_LOG_LEVEL": "WARNING"}
    with open(log, "ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "run", "--single", "--no-migrate"],
            env=env,
            stdout=sink,
            stderr=sink,
        )
    yield proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]


def insert(conn: Conn, student: UUID, course: UUID, metadata: Any) -> UUID | None:
    """Write as the payment service would; None when the database refuses the row."""
    try:
        with conn.transaction():
            return f.payment(conn, student, course, metadata)
    except (psycopg.DataError, ValueError):
        return None  # e.g. NUL bytes: PostgreSQL text and jsonb cannot hold them


def has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False


def outcome(conn: Conn, payment: UUID) -> DictRow | None:
    return conn.execute(
        """SELECT
        (SELECT id FROM student_course_purchases WHERE payment_id = %(p)s) AS purchase,
        (SELECT reason FROM payment_rejections WHERE payment_id = %(p)s
          AND resolved_at IS NULL) AS rejection,
        (SELECT errors FROM payment_rejections WHERE payment_id = %(p)s) AS errors,
        (SELECT count(*) FROM pgqueuer WHERE dedupe_key = 'purchase:' || %(p)s) AS jobs
        """,
        {"p": payment},
    ).fetchone()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batch=st.lists(bad_metadata, min_size=1, max_size=6),
    timezone=st.one_of(st.just("Asia/Kolkata"), st.just("localtime"), nasty_text),
)
def test_malformed_payments_are_refused_or_rejected(
    conn: Conn, worker: subprocess.Popen[bytes], batch: list[Any], timezone: str
) -> None:
    course = f.course(conn)
    f.trainer(conn, weekdays=[1, 2, 3, 4, 5], radius_km=50)
    good = [insert(conn, f.student(conn), course, GOOD) for _ in range(2)]
    written: list[tuple[UUID, Any]] = []
    for metadata in batch:
        try:
            student = f.student(conn, timezone=timezone)
        except (psycopg.DataError, ValueError):
            student = f.student(conn)
        payment = insert(conn, student, course, metadata)
        if payment is None:
            assert has_nul(metadata)  # the only thing the database refuses here
        else:
            written.append((payment, metadata))

    deadline = time.monotonic() + 30
    pending = [p for p in good if p] + [p for p, _ in written]
    while pending:
        assert worker.poll() is None, "the worker died"
        assert time.monotonic() < deadline, f"no outcome for {pending}"
        pending = [
            p
            for p in pending
            if (row := outcome(conn, p)) is None
            or (row["purchase"] is None and row["rejection"] is None)
            or row["jobs"]
        ]
        time.sleep(0.05)

    for payment in good:
        assert payment is not None
        assert outcome(conn, payment)["purchase"] is not None  # type: ignore[index]
    for payment, _ in written:
        row = outcome(conn, payment)
        assert row is not None
        if row["rejection"] is not None:
            assert row["errors"] and all(e["field"] and e["message"] for e in row["errors"])
    assert conn.execute("SELECT count(*) AS n FROM failed_jobs").fetchone() == {"n": 0}
