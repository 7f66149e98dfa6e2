"""`make bench`'s worlds: each pipeline phase's district has room for its payments and is out
of reach of every other, seeding it queues nothing, and the trainer search phase leaves
nothing behind for the healer or a later phase."""

from __future__ import annotations

import psycopg
from psycopg.rows import DictRow

from bench import search, world
from tests.helpers import one

Conn = psycopg.Connection[DictRow]

# For each order: the trainers who teach its course with its student in their radius, in
# the order's own district and elsewhere.
REACH = """
SELECT o.phase, o.n,
       count(t.id) FILTER (WHERE t.full_name LIKE 'Trainer ' || o.phase || ' %') AS own,
       count(t.id) FILTER (WHERE t.full_name NOT LIKE 'Trainer ' || o.phase || ' %') AS others
FROM bench.orders o
JOIN students s ON s.id = o.student_id
JOIN courses c ON c.id = o.course_id
LEFT JOIN trainers t
       ON t.specialties_norm && array_remove(ARRAY[lower(c.category), lower(c.subcategory)], NULL)
      AND kc_haversine_km(s.home_lat, s.home_lng, t.base_lat, t.base_lng) <= t.service_radius_km
GROUP BY o.phase, o.n
"""


def test_each_district_has_room_and_is_out_of_reach_of_the_others(conn: Conn, db_url: str) -> None:
    world.seed(db_url, trainers=40, students=300, booked_allocations=100)
    first = world.add_district(db_url, "backlog-120", 120)
    second = world.add_district(db_url, "rate-50", 30)

    assert (first.trainers, second.trainers) == (
        max(world.MIN_TRAINERS, 120 // world.PAYMENTS_PER_TRAINER),
        world.MIN_TRAINERS,
    )
    phases = conn.execute(
        "SELECT phase, count(*) AS orders, count(DISTINCT student_id) AS students "
        "FROM bench.orders GROUP BY phase ORDER BY phase"
    ).fetchall()
    assert [tuple(r.values()) for r in phases] == [("backlog-120", 120, 120), ("rate-50", 30, 30)]
    reach = conn.execute(REACH).fetchall()
    assert len(reach) == 150
    assert all(r["others"] == 0 for r in reach), "a trainer of another world reaches a student"
    assert min(r["own"] for r in reach) >= 3, "a student with (almost) nobody to teach them"
    # every course is bought, and the students are new: no payment yet
    assert one(conn, "SELECT count(DISTINCT course_id) AS n FROM bench.orders")["n"] == 8
    assert one(
        conn,
        "SELECT count(*) AS n FROM bench.orders o JOIN payments p ON p.student_id = o.student_id",
    ) == {"n": 0}
    # seeding ran with triggers off: no pending allocation was retried, nothing queued
    assert one(conn, "SELECT count(*) AS n FROM pgqueuer") == {"n": 0}


def test_the_search_phase_leaves_nothing_behind(conn: Conn, db_url: str) -> None:
    world.seed(db_url, trainers=40, students=300, booked_allocations=100)
    before = one(
        conn,
        "SELECT (SELECT count(*) FROM payments) AS payments, "
        "(SELECT count(*) FROM student_course_purchases) AS purchases",
    )

    figures = search.measure(db_url, 12)

    assert figures["searches"] == 12
    assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
    assert figures["purchases_left_unallocated"] == 0
    after = one(
        conn,
        "SELECT (SELECT count(*) FROM payments) AS payments, "
        "(SELECT count(*) FROM student_course_purchases) AS purchases",
    )
    assert after == before == {"payments": 100, "purchases": 100}
    assert one(conn, "SELECT count(*) AS n FROM heal_pipeline('0 seconds')") == {"n": 0}
