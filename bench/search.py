"""Trainer search timing: the allocation stage's search for a new purchase (rank first, then
check: `search_ranked`) and, on the same purchases, the full search that measures everyone
within reach (`search`, what the stage ran before issue 25)."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench.pipeline import percentiles
from workers.database.connections import fetch_all, fetch_one
from workers.database.sql import q
from workers.settings import Settings
from workers.stages.contract import StageContext, load_holidays
from workers.stages.search import remaining_plan, search, search_ranked

# Purchases to search for: the fixed world's students without a payment, by their number
# (`Student <n>`), each with a course, slot (07:00-19:00) and mode that follow from n, so
# every run searches the same mix. (A course drawn once by random() served all of them, and
# a run's figures depended on which course it drew: 200 or 520 candidates.)
NEW_PURCHASES = """
WITH picked AS (
    SELECT s.id, substring(s.full_name FROM '[0-9]+$')::int AS n
    FROM students s
    WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.student_id = s.id)
    ORDER BY 2 LIMIT %(n)s::int
), paid AS (
    INSERT INTO payments (student_id, course_id, amount_cents, status, metadata)
    SELECT picked.id, c.ids[1 + abs(hashtext('search:' || picked.n)) %% cardinality(c.ids)],
           499900, 'initiated', '{}'
    FROM picked, (SELECT array_agg(id ORDER BY title) AS ids FROM courses) c
    RETURNING id, student_id, course_id
)
INSERT INTO student_course_purchases (payment_id, student_id, course_id, purchase_tier,
    start_date, preferred_time_slot, schedule_mode, session_duration_minutes)
SELECT paid.id, paid.student_id, paid.course_id, 20, current_date + 1,
       make_time(7 + picked.n %% 13, 0, 0),
       (ARRAY['daily', 'weekdays', 'sunday_only'])[1 + picked.n %% 3], 60
FROM paid JOIN picked ON picked.id = paid.student_id
"""


UNALLOCATED = """SELECT count(*) FROM student_course_purchases pu
WHERE NOT EXISTS (SELECT 1 FROM trainer_allocations ta WHERE ta.purchase_id = pu.id)"""


def measure(url: str, samples: int) -> dict[str, Any]:
    """Time `samples` searches on purchases made for the purpose inside one transaction that
    is rolled back: nothing is left for the healer or a later phase to find."""
    figures = asyncio.run(_time_searches(url, samples))
    with psycopg.connect(url, autocommit=True) as conn:
        sessions = conn.execute("SELECT count(*) FROM tutoring_sessions").fetchone()
        trainers = conn.execute("SELECT count(*) FROM trainers").fetchone()
        left = conn.execute(UNALLOCATED).fetchone()
    return figures | {
        "trainers": trainers[0] if trainers else 0,
        "booked_sessions": sessions[0] if sessions else 0,
        "purchases_left_unallocated": left[0] if left else 0,
    }


async def _time_searches(url: str, samples: int) -> dict[str, Any]:
    settings = Settings(DATABASE_URL=url)  # type: ignore[call-arg]
    ctx = StageContext(settings)
    timings: list[float] = []
    full_timings: list[float] = []
    candidates: list[int] = []
    measured: list[int] = []
    found: list[float] = []  # the stage's search, when it found a trainer
    nobody: list[float] = []  # and when it found nobody (everyone within reach measured)
    chosen = 0
    async with (
        await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as conn,
        conn.transaction(force_rollback=True),
    ):
        # Written as the benchmark's world is (triggers off: no allocation job is queued).
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(NEW_PURCHASES, {"n": samples})
        await conn.execute("SET LOCAL session_replication_role = origin")
        rows = await fetch_all(conn, UNALLOCATED.replace("count(*)", "pu.id"), {})
        for row in rows:
            purchase = await fetch_one(
                conn, q("lock_purchase_for_allocation"), {"purchase_id": row["id"]}
            )
            assert purchase is not None
            holidays = await load_holidays(conn, purchase["start_date"])
            plan = await remaining_plan(conn, purchase, replacing=None, holidays=holidays)
            started = time.perf_counter()
            decision = await search_ranked(conn, purchase, plan, ctx)
            timings.append(time.perf_counter() - started)
            assert decision.search is not None
            measured.append(len(decision.search.places))
            chosen += decision.chosen is not None
            (found if decision.chosen is not None else nobody).append(timings[-1])
            started = time.perf_counter()
            full = await search(conn, purchase, plan, ctx)
            full_timings.append(time.perf_counter() - started)
            candidates.append(len(full.candidates))
    full_figures = percentiles(full_timings)
    return {
        "searches": len(timings),
        **{k: v for k, v in percentiles(timings).items() if k != "n"},
        "max_ms": round(max(timings) * 1000, 2),
        # Trainers measured on the costly rules by the stage's search, and the candidates
        # within reach that the full search measures.
        "mean_measured": round(statistics.mean(measured), 1),
        "mean_candidates": round(statistics.mean(candidates), 1),
        "found_a_trainer": chosen,
        # The stage's search split by outcome: a purchase that finds nobody measures everyone.
        "when_found": {k: v for k, v in percentiles(found).items() if k != "n"},
        "when_nobody": {k: v for k, v in percentiles(nobody).items() if k != "n"},
        "full_search": {k: v for k, v in full_figures.items() if k != "n"}
        | {"max_ms": round(max(full_timings) * 1000, 2)},
    }
