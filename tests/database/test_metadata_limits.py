"""Issue 10 through the real triggers and worker: payment metadata that used to loop, crash,
pass or be refused wrongly is now a recorded rejection at once (or, for a midnight slot, a
purchase), and a corrected row goes through."""

from __future__ import annotations

from datetime import time
from uuid import UUID

import psycopg
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import drain, one
from workers.rules.metadata import MAX_METADATA_BYTES

Conn = psycopg.Connection[DictRow]


def raw_payment(conn: Conn, student: UUID, course: UUID, metadata_sql: str) -> UUID:
    """A payment whose metadata is built by SQL (exact numbers, sizes no Python dict needs)."""
    row = one(
        conn,
        "INSERT INTO payments (student_id, course_id, amount_cents, status, metadata) "
        f"VALUES (%s, %s, 499900, 'succeeded', {metadata_sql}) RETURNING id",
        student,
        course,
    )
    return UUID(str(row["id"]))


def rejection(conn: Conn, payment: UUID) -> DictRow:
    return one(conn, "SELECT * FROM rejected_payments WHERE payment_id = %s", payment)


def settled_at_once(conn: Conn) -> None:
    """Nothing failed, nothing waits for a retry, no job is left."""
    assert one(conn, "SELECT count(*) AS n FROM failed_jobs")["n"] == 0
    assert f.queued_jobs(conn) == []
    assert one(conn, "SELECT count(*) AS n FROM stage_history WHERE event = 'failed'")["n"] == 0


def test_far_start_dates_are_recorded_rejections(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    sunday = f.payment(
        conn,
        f.student(conn),
        course,
        {"sessionCount": 10, "scheduleMode": "sunday_only", "startDate": "9999-12-31"},
    )
    year_5000 = f.payment(
        conn, f.student(conn), course, {"sessionCount": 10, "startDate": "5000-01-01"}
    )
    drain(db_url)

    for payment, start in ((sunday, "9999-12-31"), (year_5000, "5000-01-01")):
        row = rejection(conn, payment)
        assert row["reason"] == "invalid_metadata"
        [error] = row["errors"]
        assert error["field"] == "startDate"
        assert error["message"].startswith(f"{start} is more than a year ahead; the latest")
    assert one(conn, "SELECT count(*) AS n FROM student_course_purchases")["n"] == 0
    settled_at_once(conn)


def test_oversized_and_deep_metadata_are_recorded_rejections(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    huge = raw_payment(
        conn,
        f.student(conn),
        course,
        "jsonb_build_object('sessionCount', 10, 'note', repeat('x', 2 * 1024 * 1024))",
    )
    deep = raw_payment(
        conn,
        f.student(conn),
        course,
        "('{\"sessionCount\": 10, \"x\": ' || repeat('[', 1000) || repeat(']', 1000) || '}')"
        "::jsonb",
    )
    drain(db_url)

    big = rejection(conn, huge)
    size = one(conn, "SELECT octet_length(metadata::text) AS n FROM payments WHERE id = %s", huge)
    assert big["errors"] == [
        {
            "field": "metadata",
            "message": f"is {size['n']:,} bytes of JSON; the limit is {MAX_METADATA_BYTES:,} bytes",
        }
    ]
    assert big["metadata"] is None  # not copied: the payment row keeps it
    # Selected without its metadata: 1,000 levels would overflow Python's JSON decoder here.
    nested = one(
        conn,
        "SELECT errors, metadata IS NULL AS dropped FROM payment_rejections WHERE payment_id = %s",
        deep,
    )
    assert nested["dropped"]
    assert nested["errors"] == [
        {"field": "metadata", "message": "nests 1001 levels deep; the limit is 8 levels"}
    ]
    settled_at_once(conn)

    # Nothing is lost: correcting the row makes the purchase.
    conn.execute("UPDATE payments SET metadata = metadata - 'note' WHERE id = %s", (huge,))
    drain(db_url)
    assert one(conn, "SELECT purchase_tier FROM student_course_purchases")["purchase_tier"] == 10
    assert one(conn, "SELECT count(*) AS n FROM rejected_payments")["n"] == 1


def test_json_numbers_are_read_exactly(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    almost_ten = raw_payment(
        conn, f.student(conn), course, "'{\"sessionCount\": 10.000000000000000001}'::jsonb"
    )
    ten = raw_payment(conn, f.student(conn), course, "'{\"sessionCount\": 10.0}'::jsonb")
    drain(db_url)

    row = rejection(conn, almost_ten)
    assert row["errors"] == [
        {
            "field": "sessionCount",
            "message": "must be 10, 20 or 30, a whole number, got 10.000000000000000001",
        }
    ]
    # The rejection keeps the metadata exactly as sent (the database copies it).
    assert one(
        conn,
        "SELECT r.metadata = p.metadata AS same, r.metadata->>'sessionCount' AS n "
        "FROM payment_rejections r JOIN payments p ON p.id = r.payment_id",
    ) == {"same": True, "n": "10.000000000000000001"}
    assert (
        one(conn, "SELECT purchase_tier FROM student_course_purchases WHERE payment_id = %s", ten)[
            "purchase_tier"
        ]
        == 10
    )
    settled_at_once(conn)


def test_unicode_digits_and_host_time_zone_are_rejected(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn)
    arabic = f.payment(conn, f.student(conn), course, {"sessionCount": "\u0661\u0660"})
    fullwidth = f.payment(conn, f.student(conn), course, {"sessionCount": "\uff11\uff10"})
    clock = f.payment(
        conn, f.student(conn), course, {"sessionCount": 10, "timeSlot": "\u0664:\u0660\u0660 PM"}
    )
    host_zone = f.payment(conn, f.student(conn, timezone="localtime"), course, {"sessionCount": 10})
    drain(db_url)

    assert [e["field"] for e in rejection(conn, arabic)["errors"]] == ["sessionCount"]
    assert [e["field"] for e in rejection(conn, fullwidth)["errors"]] == ["sessionCount"]
    assert [e["field"] for e in rejection(conn, clock)["errors"]] == ["timeSlot"]
    zone = rejection(conn, host_zone)
    assert zone["reason"] == "invalid_timezone"
    assert zone["errors"] == [
        {
            "field": "students.timezone",
            "message": "'localtime' is not an IANA time zone such as 'Asia/Kolkata'",
        }
    ]
    settled_at_once(conn)


def test_a_slot_may_end_at_midnight(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn, slot=("08:00", "23:30"), name="Early")
    late = f.trainer(conn, slot=("20:00", "24:00"), name="Late", rating=3.0)
    payment = f.payment(
        conn, f.student(conn), course, {"sessionCount": 10, "timeSlot": "11:00 PM - 12:00 AM"}
    )
    drain(db_url)

    purchase = one(conn, "SELECT * FROM student_course_purchases WHERE payment_id = %s", payment)
    assert (purchase["preferred_time_slot"], purchase["session_duration_minutes"]) == (time(23), 60)
    # Only the trainer available until midnight covers it (the other ranks higher otherwise).
    allocation = one(conn, "SELECT trainer_id, status FROM trainer_allocations")
    assert (allocation["status"], allocation["trainer_id"]) == ("approved", late)
    sessions = conn.execute(
        "SELECT scheduled_time, (ends_at AT TIME ZONE 'Asia/Kolkata')::time AS ends "
        "FROM tutoring_sessions"
    ).fetchall()
    assert len(sessions) == 10
    assert {(s["scheduled_time"], s["ends"]) for s in sessions} == {(time(23), time(0))}
    settled_at_once(conn)


def test_one_rejection_lists_the_zone_the_fields_and_the_rules_across_them(
    conn: Conn, db_url: str
) -> None:
    """Issue 14: fixing what a rejection lists never reveals another problem."""
    course = f.course(conn)
    f.trainer(conn)
    spoiled = {"sessionCount": 25, "groupSize": 7, "timeSlot": "11:30 PM", "sessionDuration": 60}
    fields = f.payment(conn, f.student(conn), course, spoiled)
    zone = f.payment(conn, f.student(conn, timezone="localtime"), course, spoiled)
    drain(db_url)

    found = rejection(conn, fields)
    assert found["reason"] == "invalid_metadata"
    assert [e["field"] for e in found["errors"]] == ["sessionCount", "groupSize", "timeSlot"]
    assert "would end after midnight" in found["errors"][2]["message"]
    found = rejection(conn, zone)
    assert found["reason"] == "invalid_timezone"
    assert [e["field"] for e in found["errors"]] == [
        "students.timezone",
        "sessionCount",
        "groupSize",
        "timeSlot",
    ]
    settled_at_once(conn)
