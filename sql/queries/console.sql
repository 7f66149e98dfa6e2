-- The operations console (workers/console/): what its pages read, as kc_operator. Its actions
-- are the operator functions' named queries (ops.sql, pipeline.sql, lifecycle.sql).

-- name: console_session
-- The operator a session id belongs to; no row: not signed in (unknown, signed out,
-- expired, or the operator was revoked).
SELECT operator, expires_at FROM console_session(%(session)s::text);

-- name: console_sign_in
-- A new session for the operator whose token this is; no row: no live operator's token.
SELECT operator, expires_at
FROM console_sign_in(%(token)s::text, %(session)s::text, %(client)s::text);

-- name: console_sign_out
SELECT console_sign_out(%(session)s::text) AS ended;

-- name: console_operator_count
SELECT console_operator_count() AS operators;

-- name: console_badges
-- The counts the navigation shows on every page (each from an index or a small table).
SELECT (SELECT count(*) FROM trainer_allocations WHERE status = 'pending') AS waiting,
       (SELECT count(*) FROM stage_jobs WHERE status = 'failed') AS failed,
       (SELECT count(*) FROM rejected_payments) AS rejected;

-- name: console_funnel
-- The payments that entered the pipeline in the window (their purchase stage was enqueued:
-- a payment becoming succeeded does that) and where each is now. Every payment is counted
-- once: a purchase, an upgrade of one, a rejection, a failed purchase job, or still in the
-- purchase stage; every
-- purchase once: approved, waiting for a trainer, closed (refunded or finished), or still in
-- the allocation stage. So the parts add up to their whole on the page.
WITH entered AS (
    SELECT DISTINCT h.ref_id AS payment_id
    FROM stage_history h
    WHERE h.stage = 'purchase' AND h.event = 'enqueued'
      AND h.at > now() - %(window)s::interval
), placed AS (
    SELECT e.payment_id, pu.id AS purchase_id, pu.is_active, ta.id AS allocation_id,
           ta.status AS allocation_status,
           up.payment_id IS NOT NULL AS upgrade,
           rj.payment_id IS NOT NULL AS rejected,
           coalesce(j.status = 'failed', false) AS failed
    FROM entered e
    LEFT JOIN student_course_purchases pu ON pu.payment_id = e.payment_id
    LEFT JOIN purchase_upgrades up ON up.payment_id = e.payment_id
    LEFT JOIN payment_rejections rj ON rj.payment_id = e.payment_id AND rj.resolved_at IS NULL
    LEFT JOIN trainer_allocations ta ON ta.purchase_id = pu.id
         AND ta.status IN ('pending', 'approved')
    LEFT JOIN stage_jobs j ON j.stage = 'purchase' AND j.ref_id = e.payment_id
)
SELECT count(*) AS payments,
       count(purchase_id) AS purchases,
       count(*) FILTER (WHERE upgrade) AS upgrades,
       count(*) FILTER (WHERE rejected) AS rejected,
       count(*) FILTER (WHERE purchase_id IS NULL AND NOT upgrade AND NOT rejected AND failed)
           AS failed,
       count(*) FILTER (WHERE purchase_id IS NULL AND NOT upgrade AND NOT rejected
                          AND NOT failed) AS in_purchase_stage,
       count(*) FILTER (WHERE is_active AND allocation_status = 'approved') AS approved,
       count(*) FILTER (WHERE is_active AND allocation_status = 'pending') AS pending,
       count(*) FILTER (WHERE purchase_id IS NOT NULL AND NOT is_active) AS closed,
       count(*) FILTER (WHERE is_active AND allocation_id IS NULL) AS in_allocation_stage,
       count(*) FILTER (WHERE ss.n > 0) AS with_sessions,
       coalesce(sum(ss.n), 0)::bigint AS sessions
FROM placed
LEFT JOIN LATERAL (
    SELECT count(*) AS n FROM tutoring_sessions ts
    WHERE ts.allocation_id = placed.allocation_id AND ts.status <> 'cancelled'
) ss ON placed.allocation_id IS NOT NULL;

-- name: console_stage_chart
-- Per stage and time bucket: jobs done and their latency (enqueue, replay or heal to the
-- outcome), as stage_overview measures it for the last hour.
SELECT d.stage,
       date_bin(%(bucket)s::interval, d.at, timestamptz '2000-01-01 00:00+00') AS bucket,
       count(*) AS done,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM d.at - s.at))
           * 1000 AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM d.at - s.at))
           * 1000 AS p95_ms
FROM stage_history d
CROSS JOIN LATERAL (
    SELECT e.at FROM stage_history e
    WHERE e.ref_id = d.ref_id AND e.stage = d.stage
      AND e.event IN ('enqueued', 'replayed', 'healed') AND e.at <= d.at
    ORDER BY e.at DESC
    LIMIT 1
) s
WHERE d.stage IN ('purchase', 'allocation', 'sessions')
  AND d.event IN ('succeeded', 'skipped', 'rejected')
  AND d.at > now() - %(span)s::interval
GROUP BY 1, 2
ORDER BY 2, 1;

-- name: console_waiting_reasons
SELECT reason, count(*) AS n, min(created_at) AS oldest
FROM trainer_allocations
WHERE status = 'pending'
GROUP BY reason
ORDER BY count(*) DESC, reason;

-- name: console_waiting
-- Pending allocations, longest waiting first within each reason.
SELECT ta.reason, ta.reason_detail, ta.id AS allocation_id, ta.purchase_id,
       ta.attempts AS tries, ta.created_at AS waiting_since, ta.updated_at AS last_try,
       s.id AS student_id, s.full_name AS student, s.timezone,
       c.title AS course, pu.preferred_time_slot, pu.schedule_mode, pu.start_date,
       pu.session_duration_minutes, j.status AS job_status
FROM trainer_allocations ta
JOIN student_course_purchases pu ON pu.id = ta.purchase_id
JOIN students s ON s.id = ta.student_id
JOIN courses c ON c.id = ta.course_id
LEFT JOIN stage_jobs j ON j.stage = 'allocation' AND j.ref_id = ta.purchase_id
WHERE ta.status = 'pending'
ORDER BY ta.reason, ta.created_at
LIMIT %(limit)s::integer;

-- name: console_failed_jobs
SELECT f.job_id, f.stage, f.ref_id, f.attempts, f.failed_at, f.error_type, f.error,
       f.traceback, s.full_name AS student
FROM failed_jobs f
LEFT JOIN students s ON s.id = (f.row_data ->> 'student_id')::uuid
ORDER BY f.failed_at DESC
LIMIT %(limit)s::integer;

-- name: console_rejected_payments
SELECT r.payment_id, r.reason, r.errors, r.rejections, r.rejected_at,
       s.full_name AS student, c.title AS course
FROM rejected_payments r
JOIN students s ON s.id = r.student_id
JOIN courses c ON c.id = r.course_id
ORDER BY r.rejected_at DESC
LIMIT %(limit)s::integer;

-- name: console_find_students
-- A student's name, or part of it (the pattern is escaped by the caller).
SELECT s.id, s.full_name, s.timezone,
       (SELECT count(*) FROM payments p WHERE p.student_id = s.id) AS payments
FROM students s
WHERE s.full_name ILIKE %(pattern)s::text
ORDER BY s.full_name, s.id
LIMIT %(limit)s::integer;

-- name: console_trainers_for
-- Active trainers who teach a course, nearest to the student first: the choices an
-- assignment offers (any other trainer id may still be typed, for an override).
SELECT t.id, t.full_name, t.rating,
       (SELECT count(*) FROM trainer_allocations a
        WHERE a.trainer_id = t.id AND a.status = 'approved') AS live,
       kc_trainer_capacity(t.rating) AS capacity,
       round(kc_haversine_km(s.home_lat, s.home_lng, t.base_lat, t.base_lng)::numeric, 1)
           AS distance_km
FROM trainers t
JOIN courses c ON c.id = %(course_id)s::uuid
JOIN students s ON s.id = %(student_id)s::uuid
WHERE t.status = 'active'
  AND t.specialties_norm && array_remove(
        ARRAY[lower(btrim(c.category)), lower(btrim(c.subcategory))], NULL)
ORDER BY 6, t.id
LIMIT %(limit)s::integer;

-- name: console_pending_moves
-- Requests to move one session that wait for an operator, oldest first (the trace of the
-- purchase approves or rejects them).
SELECT r.id, r.request_type, r.requested_by, r.reason, r.created_at, ta.purchase_id,
       s.full_name AS student, s.timezone, c.title AS course, t.full_name AS trainer,
       r.original_date, r.original_time, r.new_date, r.new_time
FROM trainer_reschedules r
JOIN trainer_allocations ta ON ta.id = r.allocation_id
JOIN students s ON s.id = r.student_id
JOIN courses c ON c.id = ta.course_id
JOIN trainers t ON t.id = r.trainer_id
WHERE r.status = 'pending'
ORDER BY r.created_at
LIMIT %(limit)s::integer;
