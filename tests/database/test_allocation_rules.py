"""Matching rules, automatic retries and admin assignment, through the real stages."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import DictRow
from pydantic import ValidationError

from tests import factories as f
from tests.helpers import allocation_of, drain, one
from workers.database.sql import all_queries
from workers.settings import Settings

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}


def test_gender_preference_is_respected(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    f.trainer(conn, gender="male", name="M")
    female = f.trainer(conn, gender="Female", name="F", rating=3.0)
    student = f.student(conn, gender="female")
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    allocation = allocation_of(conn, student)
    assert allocation["trainer_id"] == female
    assert allocation["metadata"]["match"]["eliminated"] == {"gender_mismatch": 1}


def test_trainers_beyond_every_radius_are_not_measured_but_named_when_nobody_fits(
    conn: Conn, db_url: str
) -> None:
    """The search measures only trainers inside the box the largest radius draws around the
    student. When nobody there can take the purchase, the sentence and the counts name
    every trainer who teaches the course, under the rule each fails first."""
    course = f.course(conn)
    lat, lng = f.HOME
    chosen = f.trainer(conn, radius_km=10, name="Near")
    # ~22 km north: inside the box (the largest radius is 40 km), beyond its own 15 km.
    f.trainer(conn, radius_km=15, lat=lat + 0.2, name="Inside the box, beyond own radius")
    f.trainer(conn, radius_km=40, lat=lat + 3, name="North, far")  # ~330 km
    f.trainer(conn, lng=lng - 2, gender="male", name="West, far, male")  # ~217 km
    f.trainer(conn, lat=-lat, lng=lng - 180, name="Antipode")
    student = f.student(conn, gender="female")
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    allocation = allocation_of(conn, student)
    assert allocation["trainer_id"] == chosen
    match = allocation["metadata"]["match"]
    assert match["eliminated"] == {"out_of_range": 1}  # within reach: measured one by one
    assert [r["trainerId"] for r in match["ranking"]] == [str(chosen)]

    conn.execute("UPDATE trainers SET status = 'inactive' WHERE id = %s", (chosen,))
    lonely = f.student(conn, gender="female", name="Lonely", lat=lat - 0.5)  # ~55 km south
    f.payment(conn, lonely, course, GOOD)
    drain(db_url)
    pending = allocation_of(conn, lonely)
    assert pending["reason"] == "out_of_range"
    assert pending["reason_detail"].startswith("4 trainer(s) teach")
    eliminated = pending["metadata"]["match"]["eliminated"]
    assert eliminated == {"gender_mismatch": 1, "out_of_range": 3}


def test_subcategory_match_ranks_after_category(conn: Conn, db_url: str) -> None:
    course = f.course(conn, category="Robotics", subcategory="Arduino")
    f.trainer(conn, specialties=["ARDUINO"], rating=5.0, name="Sub")
    category = f.trainer(conn, specialties=["robotics"], rating=3.0, name="Cat")
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    match = allocation_of(conn, student)["metadata"]["match"]
    assert match["chosen"]["trainerId"] == str(category)
    assert [r["specialtyMatch"] for r in match["ranking"]] == ["category", "subcategory"]


def test_sequential_distance_rule(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    trainer = f.trainer(conn, radius_km=100)
    first = f.student(conn, name="First")
    f.payment(conn, first, course, {**GOOD, "timeSlot": "3:00 PM"})
    drain(db_url)
    assert allocation_of(conn, first)["trainer_id"] == trainer

    far = f.student(conn, name="Far", lat=f.HOME[0] + 0.2)  # ~22 km away
    f.payment(conn, far, course, GOOD)  # 16:00, right after the 15:00 session
    drain(db_url)
    assert allocation_of(conn, far)["reason"] == "too_far_between_sessions"

    near = f.student(conn, name="Near", lat=f.HOME[0] + 0.01)  # ~1 km away
    f.payment(conn, near, course, {**GOOD, "timeSlot": "5:00 PM"})
    drain(db_url)
    assert allocation_of(conn, near)["trainer_id"] == trainer


def test_pending_retried_when_a_trainer_is_added(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    assert allocation_of(conn, student)["reason"] == "no_trainer"
    trainer = f.trainer(conn)  # the trainers trigger enqueues the waiting purchase
    assert [j["entrypoint"] for j in f.queued_jobs(conn)] == ["allocation"]
    drain(db_url)
    allocation = allocation_of(conn, student)
    assert (allocation["status"], allocation["trainer_id"]) == ("approved", trainer)
    assert one(conn, "SELECT count(*) AS n FROM trainer_allocations")["n"] == 1


def test_pending_retried_when_availability_is_added(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    trainer = f.trainer(conn, weekdays=[])
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    assert allocation_of(conn, student)["reason"] == "no_free_slot"
    conn.execute(
        "INSERT INTO trainer_availability SELECT %s, d, '09:00', '18:00' "
        "FROM generate_series(1, 7) d",
        (trainer,),
    )
    drain(db_url)
    assert allocation_of(conn, student)["trainer_id"] == trainer


def test_pending_retried_when_capacity_is_freed(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    trainer = f.trainer(conn, rating=None, slot=("06:00", "23:00"))  # capacity 4
    students = [f.student(conn, name=f"s{i}") for i in range(5)]
    for hour, student in zip(range(8, 13), students, strict=True):
        f.payment(conn, student, course, {**GOOD, "timeSlot": f"{hour}:00"})
    drain(db_url)
    allocations = {s: allocation_of(conn, s) for s in students}
    # The five purchases were allocated concurrently: which one waits is not fixed.
    [waiting] = [s for s, a in allocations.items() if a["status"] == "pending"]
    assert allocations[waiting]["reason"] == "at_capacity"
    done = next(s for s, a in allocations.items() if a["status"] == "approved")

    conn.execute(
        "UPDATE trainer_allocations SET status = 'completed' WHERE student_id = %s", (done,)
    )
    drain(db_url)
    assert allocation_of(conn, waiting)["trainer_id"] == trainer


def test_periodic_sweep_retries_old_pending(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    assert one(conn, "SELECT sweep_pending_allocations('1 hour') AS n")["n"] == 0
    assert one(conn, "SELECT sweep_pending_allocations('0 seconds') AS n")["n"] == 1
    drain(db_url)
    assert allocation_of(conn, student)["attempts"] == 2
    # After two unsuccessful tries the sweep waits twice as long (10 min for a 5 min base).
    conn.execute("UPDATE trainer_allocations SET updated_at = now() - interval '7 minutes'")
    assert one(conn, "SELECT sweep_pending_allocations('5 minutes') AS n")["n"] == 0
    conn.execute("UPDATE trainer_allocations SET updated_at = now() - interval '11 minutes'")
    assert one(conn, "SELECT sweep_pending_allocations('5 minutes') AS n")["n"] == 1


def _approved_world(conn: Conn, db_url: str) -> tuple[UUID, UUID, UUID, UUID]:
    course = f.course(conn)
    first = f.trainer(conn, name="First", rating=4.9)
    second = f.trainer(conn, name="Second", rating=3.0)
    student = f.student(conn)
    f.payment(conn, student, course, GOOD)
    drain(db_url)
    purchase = one(conn, "SELECT id FROM student_course_purchases")["id"]
    assert allocation_of(conn, student)["trainer_id"] == first
    return course, student, purchase, second


def test_admin_reassigns_with_the_same_rules(conn: Conn, db_url: str) -> None:
    _, student, purchase, second = _approved_world(conn, db_url)
    conn.execute(
        "UPDATE tutoring_sessions SET starts_at = starts_at - interval '30 days', "
        "ends_at = ends_at - interval '30 days', "
        "scheduled_date = scheduled_date - 30 WHERE session_number <= 3"
    )
    request = one(conn, "SELECT assign_trainer(%s, %s) AS id", purchase, second)["id"]
    drain(db_url)

    assert (
        one(conn, "SELECT status, outcome FROM allocation_requests WHERE id = %s", request)[
            "status"
        ]
        == "done"
    )
    allocation = allocation_of(conn, student)
    assert allocation["trainer_id"] == second
    assert allocation["metadata"]["assignment"]["requestId"] == request
    old = one(conn, "SELECT * FROM trainer_allocations WHERE status = 'cancelled'")
    assert old["reason"] == "reassigned"
    sessions = conn.execute(
        "SELECT s.session_number, s.status, s.trainer_id FROM tutoring_sessions s "
        "ORDER BY s.session_number, s.status"
    ).fetchall()
    standing = [
        (s["session_number"], s["trainer_id"]) for s in sessions if s["status"] == "scheduled"
    ]
    # The three past sessions stay with the first trainer; 4..10 move to the second.
    assert [n for n, _ in standing] == list(range(1, 11))
    assert {t for n, t in standing if n > 3} == {second}
    assert sum(s["status"] == "cancelled" for s in sessions) == 7


def test_admin_request_refused_when_a_rule_fails(conn: Conn, db_url: str) -> None:
    _, student, purchase, _ = _approved_world(conn, db_url)
    far = f.trainer(conn, name="Far", lat=f.HOME[0] + 1, radius_km=5)
    request = one(conn, "SELECT assign_trainer(%s, %s) AS id", purchase, far)["id"]
    drain(db_url)
    row = one(conn, "SELECT status, outcome FROM allocation_requests WHERE id = %s", request)
    assert row["status"] == "refused"
    assert row["outcome"].startswith("out_of_range")
    assert allocation_of(conn, student)["trainer_id"] != far


def test_admin_override_is_recorded(conn: Conn, db_url: str) -> None:
    _, student, purchase, _ = _approved_world(conn, db_url)
    far = f.trainer(conn, name="Far", lat=f.HOME[0] + 1, radius_km=5)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="note"):
        conn.execute("SELECT assign_trainer(%s, %s, true)", (purchase, far))
    conn.execute("SELECT assign_trainer(%s, %s, true, 'parent asked for Far')", (purchase, far))
    drain(db_url)
    allocation = allocation_of(conn, student)
    assert allocation["trainer_id"] == far
    assert allocation["metadata"]["assignment"]["overriddenRule"] == "out_of_range"
    assert allocation["metadata"]["assignment"]["note"] == "parent asked for Far"


def test_candidate_search_uses_its_indexes(conn: Conn) -> None:
    course = f.course(conn)
    f.trainer(conn)
    student = f.student(conn)
    payment = f.payment(conn, student, course, GOOD, status="initiated")
    purchase = one(
        conn,
        """INSERT INTO student_course_purchases (payment_id, student_id,
        course_id, purchase_tier, start_date, preferred_time_slot, schedule_mode,
        session_duration_minutes) VALUES (%s, %s, %s, 10, current_date + 1, '16:00',
        'daily', 60) RETURNING id""",
        payment,
        student,
        course,
    )["id"]
    query = all_queries()["candidate_facts"]
    conn.execute("SET enable_seqscan = off")
    conn.execute(f"PREPARE candidate_facts AS {query.positional()}")
    # Untyped literals take the statement's parameter types.
    literals = {
        "purchase_id": f"'{UUID(str(purchase))}'",
        "starts": "'{2030-01-01 10:30+00}'",
        "ends": "'{2030-01-01 11:30+00}'",
        "at_home": "'{true}'",
        "weekdays": "'{1,2,3,4,5,6,7}'",
        "slot_start": "'16:00'",
        "slot_end": "'17:00'",
        "only_trainer": "NULL",
        "count_far": "false",
    }
    args = ", ".join(literals[name] for name in query.parameter_names())
    # Counting the trainers beyond reach (only when nobody near is eligible) reads every
    # teacher of the course, through an index.
    counting = one(
        conn,
        f"EXPLAIN (FORMAT JSON) EXECUTE candidate_facts({args.replace('false', 'true')})",
    )
    assert not [
        node
        for node in _plan_nodes(counting["QUERY PLAN"][0]["Plan"])
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "trainers"
    ]
    plan = one(conn, f"EXPLAIN (FORMAT JSON) EXECUTE candidate_facts({args})")
    text = json.dumps(plan)
    for index in (
        "trainers_active_base_idx",  # the box around the student's home
        "trainers_active_radius_idx",
        "trainer_availability_pkey",
        "trainer_allocations_trainer_live_idx",
    ):
        assert index in text, f"candidate search does not use {index}"
    # A trainer's sessions in a time window: the btree on (trainer_id, starts_at) or the
    # GiST of the no-overlap constraint on (trainer_id, tstzrange) both serve; the planner
    # picks the GiST one since 0010. Either way no scan of the whole table.
    nodes = _plan_nodes(plan["QUERY PLAN"][0]["Plan"])
    assert any(
        node.get("Index Name")
        in ("tutoring_sessions_trainer_time_idx", "tutoring_sessions_no_trainer_overlap")
        for node in nodes
    ), "candidate search reads a trainer's sessions without their index"
    assert not [
        node
        for node in nodes
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "tutoring_sessions"
    ]


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in _plan_nodes(child))]


def test_the_neighbours_distance_is_the_databases_one_value(conn: Conn, db_url: str) -> None:
    """kc_settings.max_sequential_km is the distance every search reads (the allocation stage's,
    moves and substitutes): raised to 30 km, the student 22 km away is no longer too far."""
    course = f.course(conn)
    trainer = f.trainer(conn, radius_km=100)
    first = f.student(conn, name="First")
    f.payment(conn, first, course, {**GOOD, "timeSlot": "3:00 PM"})
    drain(db_url)
    conn.execute("UPDATE kc_settings SET max_sequential_km = 30")
    far = f.student(conn, name="Far", lat=f.HOME[0] + 0.2)  # ~22 km away
    f.payment(conn, far, course, GOOD)  # 16:00, right after the 15:00 session
    drain(db_url)
    assert allocation_of(conn, far)["trainer_id"] == trainer


def test_the_retired_distance_setting_is_refused_with_where_it_went() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(MAX_SEQUENTIAL_DISTANCE_KM="7")  # type: ignore[call-arg]
    assert "UPDATE kc_settings SET max_sequential_km = 7;" in str(refused.value)
