-- A trainer's leave and substitutes for single sessions (migration 0019): what
-- `python -m workers leave ...`, `python -m workers substitute` and the console run.
-- session: the console's session id, whose operator the database records; NULL: the login.

-- name: leave_request
SELECT request_leave(%(trainer_id)s::uuid, %(first_day)s::date, %(last_day)s::date,
                     %(reason)s::text, %(session)s::text) AS leave_id;

-- name: leave_approve
-- One row per session of the trainer in those days: substituted, cancelled or handed_over.
SELECT session_id, student_id, scheduled_date, scheduled_time, outcome, trainer_id, detail
FROM approve_leave(%(leave_id)s::bigint, %(handover_days)s::integer, %(session)s::text);

-- name: leave_cancel
-- One row per future session the leave had given a substitute: given_back or kept.
SELECT session_id, student_id, scheduled_date, scheduled_time, outcome, trainer_id, detail
FROM cancel_leave(%(leave_id)s::bigint, %(session)s::text);

-- name: leave_get
SELECT l.id, l.trainer_id, t.full_name AS trainer, l.first_day, l.last_day, l.status,
       l.reason, l.handed_over, l.requested_by, l.approved_by, l.cancelled_by, l.outcome
FROM trainer_leaves l JOIN trainers t ON t.id = l.trainer_id
WHERE l.id = %(leave_id)s::bigint;

-- name: leave_list
-- Leaves not cancelled that have not ended (all: every leave), of one trainer or all.
SELECT l.id, l.trainer_id, t.full_name AS trainer, l.first_day, l.last_day, l.status,
       l.reason, l.requested_by, l.approved_by, l.cancelled_by, l.outcome
FROM trainer_leaves l JOIN trainers t ON t.id = l.trainer_id
WHERE (%(trainer_id)s::uuid IS NULL OR l.trainer_id = %(trainer_id)s::uuid)
  AND (%(all)s::boolean OR (l.status <> 'cancelled' AND l.last_day >= current_date - 1))
ORDER BY l.first_day, l.id
LIMIT 500;

-- name: substitute_session
SELECT substitute_session(%(session_id)s::uuid, %(trainer_id)s::uuid, %(session)s::text)
    AS substitute_id;

-- name: leave_approve_summary
-- The console's one line: what approving did, counted.
SELECT count(*) FILTER (WHERE outcome = 'substituted') AS substituted,
       count(*) FILTER (WHERE outcome = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE outcome = 'handed_over') AS handed_over
FROM approve_leave(%(leave_id)s::bigint, %(handover_days)s::integer, %(session)s::text);

-- name: leave_cancel_summary
SELECT count(*) FILTER (WHERE outcome = 'given_back') AS given_back,
       count(*) FILTER (WHERE outcome = 'kept') AS kept
FROM cancel_leave(%(leave_id)s::bigint, %(session)s::text);
