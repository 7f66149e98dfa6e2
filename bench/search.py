"""Trainer search timing: the allocation stage's candidate query plus the pure decision."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import psycopg

from workers.database.connections import fetch_one, make_pool, transaction
from workers.database.sql import q
from workers.runtime.runner import StageContext, load_holidays
from workers.settings import Settings
from workers.stages.allocation import remaining_plan, search

NEW_PURCHASES = """
INSERT INTO payments (student_id, course_id, amount_cents, status, metadata)
SELECT s.id, c.id, 499900, 'initiated', '{}'
FROM (SELECT id FROM students s
      WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.student_id = s.id)
      ORDER BY id LIMIT %(n)s) s
CROSS JOIN LATERAL (SELECT id FROM courses ORDER BY random() LIMIT 1) c;
INSERT INTO student_course_purchases (payment_id, student_id, course_id, purchase_tier,
    start_date, preferred_time_slot, schedule_mode, session_duration_minutes)
SELECT p.id, p.student_id, p.course_id, 20, current_date + 1,
       make_time(7 + (abs(hashtext(p.id::text)) % 13), 0, 0),
       (ARRAY['daily', 'weekdays', 'sunday_only'])[1 + abs(hashtext(p.id::text)) % 3], 60
FROM payments p WHERE p.status = 'initiated';
"""


def measure(url: str, samples: int) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(NEW_PURCHASES.replace("%(n)s", str(int(samples))))
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM student_course_purchases pu WHERE NOT EXISTS "
                "(SELECT 1 FROM trainer_allocations ta WHERE ta.purchase_id = pu.id)"
            ).fetchall()
        ]
        sessions = conn.execute("SELECT count(*) FROM tutoring_sessions").fetchone()
        trainers = conn.execute("SELECT count(*) FROM trainers").fetchone()
    return asyncio.run(_time_searches(url, ids)) | {
        "trainers": trainers[0] if trainers else 0,
        "booked_sessions": sessions[0] if sessions else 0,
    }


async def _time_searches(url: str, purchase_ids: list[Any]) -> dict[str, Any]:
    settings = Settings(DATABASE_URL=url)  # type: ignore[call-arg]
    ctx = StageContext(settings)
    pool = make_pool(url, 1)
    await pool.open(wait=True)
    timings: list[float] = []
    candidates: list[int] = []
    chosen = 0
    try:
        for purchase_id in purchase_ids:
            async with transaction(pool) as conn:
                purchase = await fetch_one(
                    conn, q("lock_purchase_for_allocation"), {"purchase_id": purchase_id}
                )
                assert purchase is not None
                holidays = await load_holidays(conn, purchase["start_date"])
                plan = await remaining_plan(conn, purchase, replacing=None, holidays=holidays)
                started = time.perf_counter()
                decision = await search(conn, purchase, plan, ctx)
                timings.append((time.perf_counter() - started) * 1000)
                candidates.append(len(decision.candidates))
                chosen += decision.chosen is not None
    finally:
        await pool.close()
    timings.sort()
    return {
        "searches": len(timings),
        "p50_ms": round(statistics.median(timings), 2),
        "p95_ms": round(timings[int(len(timings) * 0.95) - 1], 2),
        "max_ms": round(timings[-1], 2),
        "mean_candidates": round(statistics.mean(candidates), 1),
        "found_a_trainer": chosen,
    }
