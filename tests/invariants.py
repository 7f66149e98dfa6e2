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
    "session numbers not 1..N per purchase": """
        SELECT pu.id FROM student_course_purchases pu
        JOIN trainer_allocations ta ON ta.purchase_id = pu.id
        JOIN tutoring_sessions ts ON ts.allocation_id = ta.id AND ts.status <> 'cancelled'
        GROUP BY pu.id
        HAVING min(ts.session_number) <> 1 OR max(ts.session_number) <> count(*)""",
}


def violations(conn: psycopg.Connection[DictRow]) -> dict[str, int]:
    found = {}
    for name, query in CHECKS.items():
        rows = conn.execute(query).fetchall()
        if rows:
            found[name] = len(rows)
    return found
