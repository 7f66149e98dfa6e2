"""What support reads is true and whole (issue 26): a purchase's trace is its story (every
payment of it, every allocation, every event, in order, without repeats, each reason in
full), in `make trace` and the console alike; failures and doctor name rejected payments;
the overview's counts add up; the wording says what happened."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from uuid import UUID

import psycopg
from psycopg.rows import DictRow

from tests import factories as f
from tests.console_world import console, page_text
from tests.helpers import drain, one
from workers.ops import commands as ops
from workers.ops import story
from workers.settings import Settings

Conn = psycopg.Connection[DictRow]
WEEKDAYS = {"sessionCount": 10, "timeSlot": "5:00 PM", "scheduleMode": "weekdays"}


def trace_text(conn: Conn, ref: UUID) -> str:
    text = ops.trace(conn, ref)
    assert text is not None, f"no trace for {ref}"
    return text


def upgraded(conn: Conn, db_url: str) -> tuple[UUID, UUID, UUID, UUID]:
    """Asha's purchase of 10 sessions, upgraded to 20: (student, first payment, upgrade
    payment, purchase)."""
    course = f.course(conn)
    f.trainer(conn, name="Ravi Kumar")
    student = f.student(conn, name="Asha Rao")
    first = f.payment(conn, student, course, WEEKDAYS)
    drain(db_url)
    upgrade = f.payment(conn, student, course, {**WEEKDAYS, "sessionCount": 20, "upgrade": True})
    drain(db_url)
    purchase = one(conn, "SELECT id FROM student_course_purchases")["id"]
    return student, first, upgrade, purchase


def test_an_upgrade_payment_is_told_inside_its_purchase(conn: Conn, db_url: str) -> None:
    """On main the upgrade payment had a card of its own: "waiting for the purchase stage",
    "purchase none", while its timeline said it upgraded the purchase."""
    student, first, upgrade, purchase = upgraded(conn, db_url)
    for ref in (upgrade, first, purchase, student):
        text = trace_text(conn, ref)
        assert text.count("Asha Rao · Robotics with Arduino") == 1, text  # one story
        assert f"purchase {purchase}" in text
        assert f"{first}  first payment: 10 sessions; succeeded" in text
        assert f"{upgrade}  upgrade: 10 -> 20 sessions; succeeded" in text
        assert "waiting for the purchase stage" not in text
        assert "On track: Trainer Ravi Kumar teaches it: 20 sessions written, 20 ahead." in text
    with console(db_url) as client:
        page = page_text(client.get(f"/trace/{upgrade}").text)
    assert page.count("Asha Rao · Robotics with Arduino") == 1
    assert "Waiting:" not in page and "purchase none" not in page
    assert "upgrade: 10 -> 20 sessions; succeeded" in page
    assert "On track: Trainer Ravi Kumar teaches it: 20 sessions written" in page


def test_an_upgrade_not_applied_yet_is_a_waiting_payment_of_its_own(
    conn: Conn, db_url: str
) -> None:
    student, _first, _upgrade, _purchase = upgraded(conn, db_url)
    course = one(conn, "SELECT id FROM courses")["id"]
    later = f.payment(conn, student, course, {**WEEKDAYS, "sessionCount": 30, "upgrade": True})
    text = trace_text(conn, student)
    assert text.count("Asha Rao · Robotics with Arduino") == 2
    assert "Waiting: The payment is waiting for the purchase stage." in text
    assert f"payment  {later}, succeeded" in text


def test_reasons_are_printed_whole_and_rejections_read_as_sentences(
    conn: Conn, db_url: str
) -> None:
    """On main every field was cut at 80 characters and rejected_errors printed as a Python
    list."""
    course = f.course(conn)
    trainer = f.trainer(conn, name="Ravi Kumar")
    student = f.student(conn, name="Asha Rao")
    payment = f.payment(conn, student, course, WEEKDAYS)
    bad = f.payment(conn, f.student(conn, name="Kiran Das"), course, {"sessionCount": 7})
    drain(db_url)
    conn.execute("UPDATE trainers SET status = 'inactive' WHERE id = %s", (trainer,))
    drain(db_url)
    text = trace_text(conn, payment)
    detail = one(
        conn,
        "SELECT reason_detail FROM trainer_allocations WHERE student_id = %s "
        "AND status = 'pending'",
        student,
    )["reason_detail"]
    assert len(detail) > 80 and detail in text
    assert "..." not in text
    rejected = trace_text(conn, bad)
    assert "sessionCount: must be 10, 20 or 30, got 7" in rejected
    assert "[{" not in rejected and "'field'" not in rejected


def test_the_trace_keeps_every_allocation_and_its_events(conn: Conn, db_url: str) -> None:
    """On main `make trace` read the history of the live allocation only: after a trainer left,
    the first allocation's sessions and their events were gone from it."""
    course = f.course(conn)
    first_trainer = f.trainer(conn, name="Ravi Kumar")
    student = f.student(conn, name="Asha Rao")
    payment = f.payment(conn, student, course, WEEKDAYS)
    drain(db_url)
    f.trainer(conn, name="Sita Menon")
    conn.execute("UPDATE trainers SET status = 'inactive' WHERE id = %s", (first_trainer,))
    drain(db_url)
    allocations = conn.execute(
        "SELECT id, status FROM trainer_allocations ORDER BY created_at"
    ).fetchall()
    assert [a["status"] for a in allocations] == ["cancelled", "approved"]
    text = trace_text(conn, payment)
    old, new = (a["id"] for a in allocations)
    assert f"{old}  cancelled (trainer_left), trainer Ravi Kumar {first_trainer}" in text
    assert "10 sessions (numbers 1..10): 0 completed, 10 cancelled, 0 ahead" in text
    assert f"{new}  approved, trainer Sita Menon" in text
    # Both allocations' sessions stages are on the timeline, in order.
    written = [line for line in text.splitlines() if "sessions   succeeded" in line]
    assert len(written) == 2, text


def test_a_run_of_identical_events_is_told_once(conn: Conn, db_url: str) -> None:
    """On main six `allocation enqueued (job 17)` rows, one per trainer row inserted, were six
    lines of the timeline. History written so stays as it is; the trace tells it once."""
    course = f.course(conn)
    f.trainer(conn, name="Ravi Kumar")
    student = f.student(conn, name="Asha Rao")
    payment = f.payment(conn, student, course, WEEKDAYS)
    drain(db_url)
    purchase = one(conn, "SELECT id FROM student_course_purchases")["id"]
    conn.execute(
        "INSERT INTO stage_history (stage, ref_id, event, job_id) "
        "SELECT 'allocation', %s, 'enqueued', 17 FROM generate_series(1, 6)",
        (purchase,),
    )
    text = trace_text(conn, payment)
    lines = [line for line in text.splitlines() if "(job 17)" in line]
    assert len(lines) == 1 and "(job 17) x6, the last at" in lines[0], text
    with console(db_url) as client:
        page = page_text(client.get(f"/trace/{payment}").text)
    assert page.count("(job 17)") == 1 and "(job 17) x6" in page


def test_failures_and_doctor_name_a_rejected_payment(conn: Conn, db_url: str) -> None:
    """On main `make failures` said "(none)" and `make doctor` "all checks passed"."""
    course = f.course(conn)
    bad = f.payment(conn, f.student(conn, name="Kiran Das"), course, {"sessionCount": 7})
    drain(db_url)
    shown = ops.failures(conn)
    assert "Failed jobs: 0" in shown and "Rejected payments: 1" in shown
    assert f"{bad}  rejected" in shown
    assert "sessionCount: must be 10, 20 or 30, got 7" in shown
    assert "make replay STAGE=purchase ID=<payment id>" in shown
    problems = ops.doctor(db_url, Settings(DATABASE_URL=db_url))  # type: ignore[call-arg]
    rejected = [p for p in problems if "rejected" in p.what]
    assert [p.what for p in rejected] == [
        "1 payment(s) rejected for their metadata, waiting for a fix"
    ]
    assert rejected[0].fix.startswith("make failures;")


def test_the_overview_counts_a_refunded_purchase(conn: Conn, db_url: str) -> None:
    """On main "4 purchases (+1 upgrades), 2 approved, 1 waiting": the refunded one was
    counted nowhere."""
    course = f.course(conn)
    f.trainer(conn, name="Ravi Kumar")
    kept = f.payment(conn, f.student(conn, name="Asha"), course, WEEKDAYS)
    refunded = f.payment(conn, f.student(conn, name="Ben"), course, WEEKDAYS)
    drain(db_url)
    conn.execute("UPDATE payments SET status = 'refunded' WHERE id = %s", (refunded,))
    f.payment(
        conn,
        one(conn, "SELECT student_id FROM payments WHERE id = %s", kept)["student_id"],
        course,
        {**WEEKDAYS, "sessionCount": 20, "upgrade": True},
    )
    drain(db_url)
    with console(db_url) as client:
        text = page_text(client.get("/").text)
    assert (
        "3 payments succeeded = 2 purchases made + 1 upgrade applied + 0 rejected "
        "+ 0 purchase job failed + 0 in the purchase stage"
    ) in text
    assert (
        "2 purchases = 1 trainer approved + 0 waiting for a trainer "
        "+ 1 closed (refunded or finished) + 0 in the allocation stage"
    ) in text


def test_a_makeup_and_a_request_are_worded_as_they_happened(conn: Conn, db_url: str) -> None:
    """On main: "1 sessions written (21..21 of 20)", "1 more sessions", and the CLI's
    "request 1 done: request 1: ..."."""
    course = f.course(conn)
    f.trainer(conn, name="Ravi Kumar")
    student = f.student(conn, name="Asha Rao")
    payment = f.payment(conn, student, course, WEEKDAYS)
    drain(db_url)
    conn.execute(
        "UPDATE tutoring_sessions SET status = 'cancelled' WHERE student_id = %s "
        "AND session_number = 3",
        (student,),
    )
    drain(db_url)
    text = trace_text(conn, payment)
    assert "1 more session for allocation" in text
    assert (
        "1 session written: number 11, making up for cancelled sessions (the course has 10)"
    ) in text
    assert "sessions written (" not in text and not re.search(r"\b1 sessions\b", text)

    purchase = one(conn, "SELECT id FROM student_course_purchases")["id"]
    env = {**os.environ, "DATABASE_URL": db_url}
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers", "run", "--single", "--no-migrate"],
        env={**env, "KC_IDLE_POLL_SECONDS": "0.2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "workers", "reschedule", str(purchase), "--slot", "6 PM"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert done.returncode == 0, done.stderr
    [line] = [x for x in done.stdout.splitlines() if x.startswith("request 1 done")]
    assert line.startswith("request 1 done: sessions ") and line.count("request 1") == 1


def test_trace_of_an_unknown_id_fails(db_url: str) -> None:
    """On main `make trace` of an unknown id printed a sentence and exited 0."""
    unknown = uuid.uuid4()
    answer = subprocess.run(
        [sys.executable, "-m", "workers", "trace", str(unknown)],
        env={**os.environ, "DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert answer.returncode == 1
    assert answer.stdout == ""
    assert f"no payment, purchase, allocation or student has the id {unknown}" in answer.stderr


def test_the_story_of_a_lone_payment_and_of_a_purchase_load_the_same_way() -> None:
    """`load` asks for rows and is sent them: no I/O, so the command and the console share it."""
    payment, purchase, allocation = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    asked: list[str] = []
    header = {"payment_id": payment, "timezone": "Asia/Kolkata"}
    answers = {
        "trace_stories": [{"purchase_id": purchase, "payment_id": payment}],
        "trace_headers": [header],
        "trace_payments": [{"id": payment}],
        "trace_allocations": [{"id": allocation}],
        "trace_requests": [],
        "trace_events": [{"ref_id": allocation}],
        "trace_business_events": [{"type": "PURCHASE_CREATED"}],
    }

    def fetch(name: str, params: dict[str, object]) -> list[dict[str, object]]:
        asked.append(name)
        if name == "trace_events":
            assert params == {"refs": [payment, purchase, allocation]}
        if name == "trace_business_events":
            assert params == {"purchases": [purchase]}
        return answers[name]  # type: ignore[return-value]

    [told] = story.load_sync(fetch, payment)
    assert asked == [
        "trace_stories",
        "trace_headers",
        "trace_payments",
        "trace_allocations",
        "trace_requests",
        "trace_events",
        "trace_business_events",
    ]
    assert (told.header, list(told.allocations)) == (header, [{"id": allocation}])
    assert list(told.told) == [{"type": "PURCHASE_CREATED"}]
    assert story.load_sync(lambda name, params: [], payment) == []
