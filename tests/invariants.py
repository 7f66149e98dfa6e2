"""Whole-database invariants, checked after concurrent and crashing runs."""

from __future__ import annotations

import psycopg
from psycopg.rows import DictRow

CHECKS: dict[str, str] = {
    "succeeded payment without exactly one purchase, upgrade or rejection": """
        SELECT p.id FROM payments p
        WHERE p.status = 'succeeded'
          AND (SELECT count(*) FROM student_course_purchases pu WHERE pu.payment_id = p.id)
            + (SELECT count(*) FROM purchase_upgrades u WHERE u.payment_id = p.id)
            + (SELECT count(*) FROM payment_rejections r
               WHERE r.payment_id = p.id AND r.resolved_at IS NULL) <> 1""",
    "active purchase without exactly one live allocation": """
        SELECT pu.id FROM student_course_purchases pu
        WHERE pu.is_active AND (SELECT count(*) FROM trainer_allocations ta
                                WHERE ta.purchase_id = pu.id
                                  AND ta.status IN ('pending', 'approved')) <> 1""",
    "approved allocation whose purchase does not have exactly its sessions": """
        SELECT ta.id FROM trainer_allocations ta
        JOIN student_course_purchases pu ON pu.id = ta.purchase_id
        WHERE ta.status = 'approved'
          AND (SELECT count(*) FROM tutoring_sessions ts
               JOIN trainer_allocations a2 ON a2.id = ts.allocation_id
               WHERE a2.purchase_id = pu.id AND ts.status <> 'cancelled') <> pu.purchase_tier""",
    "trainer with overlapping sessions": """
        SELECT a.trainer_id FROM tutoring_sessions a
        JOIN tutoring_sessions b ON a.trainer_id = b.trainer_id AND a.id < b.id
        WHERE a.status = 'scheduled' AND b.status = 'scheduled'
          AND a.starts_at < b.ends_at AND b.starts_at < a.ends_at""",
    "trainer over capacity": """
        SELECT t.id FROM trainers t
        WHERE (SELECT count(*) FROM trainer_allocations ta
               WHERE ta.trainer_id = t.id AND ta.status = 'approved'
                 AND NOT ta.capacity_override) > kc_trainer_capacity(t.rating)""",
    "session numbers not 1..N for a purchase without a cancelled session": """
        SELECT pu.id FROM student_course_purchases pu
        JOIN trainer_allocations ta ON ta.purchase_id = pu.id
        JOIN tutoring_sessions ts ON ts.allocation_id = ta.id
        GROUP BY pu.id
        HAVING count(*) FILTER (WHERE ts.status = 'cancelled') = 0
           AND (min(ts.session_number) <> 1 OR max(ts.session_number) <> count(*))""",
    # Make-ups and moves number on: standing numbers are unique and follow time.
    "standing session numbers repeated or out of time order in a purchase": """
        SELECT a.id FROM tutoring_sessions a
        JOIN trainer_allocations aa ON aa.id = a.allocation_id
        JOIN trainer_allocations ba ON ba.purchase_id = aa.purchase_id
        JOIN tutoring_sessions b ON b.allocation_id = ba.id AND b.id <> a.id
        WHERE a.status <> 'cancelled' AND b.status <> 'cancelled'
          AND a.session_number <= b.session_number AND a.starts_at >= b.starts_at""",
    "live allocation of an inactive purchase": """
        SELECT ta.id FROM trainer_allocations ta
        JOIN student_course_purchases pu ON pu.id = ta.purchase_id
        WHERE ta.status IN ('pending', 'approved') AND NOT pu.is_active""",
    "future session of an allocation that is not approved": """
        SELECT ts.id FROM tutoring_sessions ts
        JOIN trainer_allocations ta ON ta.id = ts.allocation_id
        WHERE ts.status = 'scheduled' AND ts.starts_at > now() AND ta.status <> 'approved'""",
    "live allocation whose trainer can no longer teach what is ahead": """
        SELECT allocation_id FROM unfit_allocations""",
    "completed or missed session that has not started": """
        SELECT id FROM tutoring_sessions
        WHERE status IN ('completed', 'missed') AND starts_at > now()""",
    "completed allocation with a session still scheduled": """
        SELECT ta.id FROM trainer_allocations ta
        JOIN tutoring_sessions ts ON ts.allocation_id = ta.id AND ts.status = 'scheduled'
        WHERE ta.status = 'completed'""",
}


def violations(conn: psycopg.Connection[DictRow]) -> dict[str, int]:
    found = {}
    for name, query in CHECKS.items():
        rows = conn.execute(query).fetchall()
        if rows:
            found[name] = len(rows)
    return found
