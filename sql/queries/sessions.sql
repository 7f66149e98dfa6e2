-- Sessions stage: an approved allocation gets its whole schedule, in one transaction.

-- name: lock_allocations_for_sessions
-- Locks a batch's allocations (in id order, so two workers never wait on each other in a
-- circle) and reads, for each, where the purchase's schedule stands: sessions that are not
-- cancelled, over every allocation of the purchase (delivered), and where the schedule ends
-- (last number, last date): after those and after this allocation's own sessions, cancelled
-- ones included, so a make-up follows the session it replaces and never reuses its number.
SELECT ta.id, ta.status, ta.trainer_id, ta.student_id, ta.course_id, ta.first_session_date,
       pu.purchase_tier, pu.schedule_mode, pu.preferred_time_slot,
       pu.session_duration_minutes, pu.learning_mode, s.timezone,
       standing.delivered, standing.last_number, standing.last_date, standing.own_last_date
FROM trainer_allocations ta
JOIN student_course_purchases pu ON pu.id = ta.purchase_id
JOIN students s ON s.id = ta.student_id
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE ts.status <> 'cancelled') AS delivered,
           coalesce(max(ts.session_number)
                    FILTER (WHERE ts.status <> 'cancelled' OR ts.allocation_id = ta.id), 0)
               AS last_number,
           max(ts.scheduled_date)
               FILTER (WHERE ts.status <> 'cancelled' OR ts.allocation_id = ta.id) AS last_date,
           max(ts.scheduled_date) FILTER (WHERE ts.allocation_id = ta.id) AS own_last_date
    -- The purchase's allocations first, then their sessions by allocation id: a join here
    -- let a planner with stale statistics hash all of tutoring_sessions once per allocation.
    FROM tutoring_sessions ts
    WHERE ts.allocation_id = ANY (ARRAY(SELECT other.id FROM trainer_allocations other
                                        WHERE other.purchase_id = ta.purchase_id))
) standing
WHERE ta.id = ANY (%(allocation_ids)s::uuid[])
ORDER BY ta.id
FOR UPDATE OF ta;

-- name: insert_sessions
-- Set-based: every session of a batch's allocations in one statement. Existing numbers are
-- left alone, so a replay writes nothing twice; the rows written say how many per allocation.
INSERT INTO tutoring_sessions (
    allocation_id, session_number, student_id, trainer_id, course_id, scheduled_date,
    scheduled_time, starts_at, ends_at, duration_minutes, delivery)
SELECT n.allocation_id, n.session_number, n.student_id, n.trainer_id, n.course_id,
       n.scheduled_date, n.scheduled_time, n.starts_at, n.ends_at, n.duration_minutes,
       n.delivery
FROM unnest(%(allocation_ids)s::uuid[], %(numbers)s::smallint[], %(student_ids)s::uuid[],
            %(trainer_ids)s::uuid[], %(course_ids)s::uuid[], %(dates)s::date[],
            %(times)s::time[], %(starts)s::timestamptz[], %(ends)s::timestamptz[],
            %(durations)s::smallint[], %(deliveries)s::text[])
     AS n(allocation_id, session_number, student_id, trainer_id, course_id, scheduled_date,
          scheduled_time, starts_at, ends_at, duration_minutes, delivery)
ON CONFLICT (allocation_id, session_number) DO NOTHING
RETURNING allocation_id;
