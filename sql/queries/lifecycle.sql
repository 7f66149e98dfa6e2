-- Time passing: completion, trainers who leave or change, reschedules (workers/stages/lifecycle.py).

-- name: complete_finished
SELECT sessions_completed, courses_completed
FROM complete_finished(%(grace)s::interval, %(limit)s::integer);

-- name: sweep_lifecycle
SELECT sweep_lifecycle(%(limit)s::integer) AS enqueued;

-- name: open_schedule_changes
SELECT id, from_time_slot, to_time_slot, from_start_date, to_start_date, from_schedule_mode,
       to_schedule_mode
FROM schedule_changes
WHERE purchase_id = %(purchase_id)s::uuid AND status = 'open'
ORDER BY id
FOR UPDATE;

-- name: close_schedule_changes
UPDATE schedule_changes
SET status = 'done', outcome = %(outcome)s::text, decided_at = now(),
    allocation_id = %(allocation_id)s::uuid
WHERE id = ANY (%(ids)s::bigint[]) AND status = 'open';

-- name: unfit_allocation
SELECT why, detail FROM unfit_allocations WHERE allocation_id = %(allocation_id)s::uuid;

-- name: end_allocation
SELECT end_allocation(%(allocation_id)s::uuid, %(reason)s::text, %(detail)s::text)
    AS cancelled;

-- name: live_allocation
SELECT id, status, trainer_id, reason, reason_detail
FROM trainer_allocations
WHERE purchase_id = %(purchase_id)s::uuid AND status IN ('pending', 'approved');

-- name: annotate_allocation
-- Adds a note to the allocation's metadata; a pending allocation may also take a reason code
-- of its own (trainer_left) before the matcher's sentence.
UPDATE trainer_allocations
SET metadata = metadata || %(note)s::jsonb,
    reason = CASE WHEN status = 'pending' THEN coalesce(%(pending_reason)s::text, reason)
                  ELSE reason END,
    reason_detail = CASE WHEN status = 'pending' AND %(pending_reason)s::text IS NOT NULL
                         THEN %(why)s::text || '; ' || reason_detail
                         ELSE reason_detail END
WHERE id = %(allocation_id)s::uuid
RETURNING id, status, trainer_id, reason, reason_detail;

-- name: request_reschedule
SELECT reschedule(%(purchase_id)s::uuid, %(time_slot)s::text, %(start_date)s::date,
                  %(schedule_mode)s::text, %(session)s::text) AS request_id;

-- name: schedule_change_status
SELECT id, status, outcome, allocation_id FROM schedule_changes
WHERE id = %(request_id)s::bigint;

-- name: lifecycle_counts
-- For `make status`: sessions past their end and the grace still scheduled (the completion
-- backlog), courses finished in the last day, live allocations whose trainer can no longer
-- teach them, reschedule requests not carried out yet.
SELECT (SELECT count(*) FROM tutoring_sessions
        WHERE status = 'scheduled' AND ends_at < now() - %(grace)s::interval)
           AS sessions_due,
       (SELECT count(*) FROM stage_history
        WHERE stage = 'allocation' AND event = 'completed' AND at > now() - interval '1 day')
           AS courses_completed_24h,
       (SELECT count(*) FROM unfit_allocations) AS unfit_allocations,
       (SELECT count(*) FROM schedule_changes WHERE status = 'open') AS open_reschedules;

-- name: cover_leaves
-- Sessions written for a trainer on approved leave after its approval get a substitute or are
-- cancelled with their make-up, as the approval would have done (migration 0022).
SELECT cover_leaves(%(limit)s::integer) AS covered;
