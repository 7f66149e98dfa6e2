-- The trace: a purchase told as a story (every payment of it, every allocation, every event,
-- in order), read by `make trace` and the console's trace page alike (workers/ops/story.py).

-- name: trace_stories
-- The stories an id belongs to, newest first. A purchase is found by its own id, its payment,
-- an upgrade payment applied to it, one of its allocations or its student; a payment that made
-- no purchase and upgraded none (waiting, rejected, failed, not succeeded) is a story alone.
WITH payments_of AS (
    SELECT p.id FROM payments p
    WHERE p.id = %(id)s::uuid OR p.student_id = %(id)s::uuid
), purchases_of AS (
    SELECT pu.id FROM student_course_purchases pu
    WHERE pu.id = %(id)s::uuid OR pu.student_id = %(id)s::uuid
       OR pu.payment_id IN (SELECT id FROM payments_of)
    UNION
    SELECT up.purchase_id FROM purchase_upgrades up
    WHERE up.payment_id IN (SELECT id FROM payments_of)
    UNION
    SELECT ta.purchase_id FROM trainer_allocations ta WHERE ta.id = %(id)s::uuid
)
SELECT pu.id AS purchase_id, pu.payment_id, p.created_at AS at
FROM student_course_purchases pu
JOIN payments p ON p.id = pu.payment_id
WHERE pu.id IN (SELECT id FROM purchases_of)
UNION ALL
SELECT NULL, p.id, p.created_at
FROM payments p
WHERE p.id IN (SELECT id FROM payments_of)
  AND NOT EXISTS (SELECT 1 FROM student_course_purchases pu WHERE pu.payment_id = p.id)
  AND NOT EXISTS (SELECT 1 FROM purchase_upgrades up WHERE up.payment_id = p.id)
ORDER BY at DESC, payment_id;

-- name: trace_headers
-- Where each story is now (purchase_trace of its first payment), with the names to show.
SELECT t.*, s.full_name AS student, s.timezone, c.title AS course,
       tr.full_name AS trainer, pu.preferred_time_slot, pu.schedule_mode, pu.start_date,
       pu.session_duration_minutes
FROM purchase_trace t
JOIN students s ON s.id = t.student_id
JOIN courses c ON c.id = t.course_id
LEFT JOIN trainers tr ON tr.id = t.trainer_id
LEFT JOIN student_course_purchases pu ON pu.id = t.purchase_id
WHERE t.payment_id = ANY (%(payments)s::uuid[]);

-- name: trace_payments
-- Every payment of a purchase: the first, then each upgrade (reverted when its payment was
-- refunded). A refund is the payment's own status, changed at updated_at.
SELECT p.id, 'first' AS kind, p.status, p.amount_cents, p.currency, p.confirmed_at,
       p.created_at, p.updated_at,
       coalesce((SELECT u.from_tier FROM purchase_upgrades u
                 WHERE u.purchase_id = pu.id ORDER BY u.created_at LIMIT 1),
                pu.purchase_tier) AS to_tier,
       NULL::smallint AS from_tier, NULL::timestamptz AS reverted_at
FROM student_course_purchases pu
JOIN payments p ON p.id = pu.payment_id
WHERE pu.id = %(purchase_id)s::uuid
UNION ALL
SELECT p.id, 'upgrade', p.status, p.amount_cents, p.currency, p.confirmed_at,
       p.created_at, p.updated_at, u.to_tier, u.from_tier, u.reverted_at
FROM purchase_upgrades u
JOIN payments p ON p.id = u.payment_id
WHERE u.purchase_id = %(purchase_id)s::uuid
ORDER BY created_at, id;

-- name: trace_allocations
-- Every allocation a purchase had, oldest first, with what became of its sessions: a
-- reassignment, a trainer who left or a reschedule ends one (its future sessions cancelled)
-- and starts the next, so a course's cancelled sessions are read per allocation.
SELECT ta.id, ta.status, ta.reason, ta.reason_detail, ta.trainer_id, t.full_name AS trainer,
       ta.attempts, ta.capacity_override, ta.created_at, ta.allocated_at, ta.updated_at,
       count(s.id) AS sessions,
       count(s.id) FILTER (WHERE s.status = 'completed') AS completed,
       count(s.id) FILTER (WHERE s.status = 'missed') AS missed,
       count(s.id) FILTER (WHERE s.status = 'cancelled') AS cancelled,
       count(s.id) FILTER (WHERE s.status = 'scheduled' AND s.starts_at > now()) AS ahead,
       min(s.session_number) AS first_number, max(s.session_number) AS last_number,
       -- sessions a substitute teaches (a trainer's leave, or an operator's substitute)
       count(s.id) FILTER (WHERE s.status = 'scheduled' AND s.original_trainer_id IS NOT NULL)
           AS substituted
FROM trainer_allocations ta
LEFT JOIN trainers t ON t.id = ta.trainer_id
LEFT JOIN tutoring_sessions s ON s.allocation_id = ta.id
WHERE ta.purchase_id = %(purchase_id)s::uuid
GROUP BY ta.id, t.full_name
ORDER BY ta.created_at, ta.id;

-- name: trace_events
-- The history of the given rows in order, a run of identical rows (the same stage, event,
-- row, job, detail and actor one after the other: a job that absorbed several requests)
-- told once with how many times it happened.
WITH ordered AS (
    SELECT h.id, h.at, h.stage, h.event, h.ref_id, h.job_id, h.detail, h.actor,
           row_number() OVER (ORDER BY h.at, h.id)
             - row_number() OVER (PARTITION BY h.stage, h.event, h.ref_id, h.job_id, h.detail,
                                               h.actor
                                  ORDER BY h.at, h.id) AS run
    FROM stage_history h
    WHERE h.ref_id = ANY (%(refs)s::uuid[])
)
SELECT min(at) AS at, max(at) AS last_at, stage, event, ref_id, job_id, detail, actor,
       count(*) AS times
FROM ordered
GROUP BY run, stage, event, ref_id, job_id, detail, actor
ORDER BY min(at), min(id);

-- name: trace_requests
-- An operator's requests for a purchase: assignments and reschedules, with their outcome;
-- and requests to move one of its sessions (the app's or an operator's; pending_move: one
-- an operator may still approve or reject).
SELECT 'assign' AS kind, r.id::text AS id, r.requested_by, r.requested_at, r.status,
       r.outcome,
       'trainer ' || r.trainer_id || ' (' || t.full_name || ')'
           || CASE WHEN r.override THEN ', override: ' || r.note ELSE '' END AS what,
       false AS pending_move
FROM allocation_requests r
JOIN trainers t ON t.id = r.trainer_id
WHERE r.purchase_id = %(purchase_id)s::uuid
UNION ALL
SELECT 'reschedule', c.id::text, c.requested_by, c.requested_at, c.status, c.outcome,
       c.from_schedule_mode || ' at ' || to_char(c.from_time_slot, 'HH24:MI') || ' from '
           || c.from_start_date || ' -> ' || c.to_schedule_mode || ' at '
           || to_char(c.to_time_slot, 'HH24:MI') || ' from ' || c.to_start_date,
       false
FROM schedule_changes c
WHERE c.purchase_id = %(purchase_id)s::uuid
UNION ALL
SELECT 'move', m.id::text, m.requested_by, m.created_at, m.status,
       coalesce(m.rejection_reason, m.outcome)
           || CASE WHEN m.reviewed_by IS NOT NULL THEN ' (' || m.reviewed_by || ')' ELSE '' END,
       'the session of ' || to_char(m.original_date, 'Dy DD Mon YYYY') || ' '
           || to_char(m.original_time, 'HH24:MI') || ' -> '
           || to_char(m.new_date, 'Dy DD Mon YYYY') || ' ' || to_char(m.new_time, 'HH24:MI')
           || ', for the ' || m.request_type || ': ' || m.reason,
       m.status = 'pending'
FROM trainer_reschedules m
JOIN trainer_allocations ta ON ta.id = m.allocation_id
WHERE ta.purchase_id = %(purchase_id)s::uuid
ORDER BY 4;
