-- Operations: what `python -m workers status|trace|replay|failures|doctor` run.

-- name: stage_overview
SELECT stage, queued, in_flight, failed,
       date_trunc('second', oldest_waiting)::text AS oldest_waiting, done_last_hour,
       round(extract(epoch FROM p50_latency)::numeric * 1000, 1) AS p50_ms,
       round(extract(epoch FROM p95_latency)::numeric * 1000, 1) AS p95_ms
FROM stage_overview;

-- name: pipeline_counts
SELECT (SELECT count(*) FROM rejected_payments) AS rejected_payments,
       (SELECT count(*) FROM trainer_allocations WHERE status = 'pending') AS pending_allocations,
       (SELECT count(*) FROM stuck_rows(%(stuck_after)s::interval)) AS stuck_rows,
       (SELECT count(*) FROM failed_jobs) AS failed_jobs;

-- name: failures
SELECT job_id, stage, ref_id, attempts, failed_at, error_type, error FROM failed_jobs
ORDER BY failed_at;

-- name: rejected_payments_list
SELECT payment_id, reason, errors, rejections, rejected_at FROM rejected_payments
ORDER BY rejected_at;

-- name: replay_stage
-- session: the console's session id, whose operator the database records as the actor
-- (stage_history.actor); NULL: the database login.
SELECT replay_stage(%(stage)s::text, %(ref_id)s::uuid, %(session)s::text) AS job_id;

-- name: replay_failed
SELECT replay_failed(%(stage)s::text, %(session)s::text) AS replayed;

-- name: operator_add
-- The token is stored as its SHA-256 only (sql/migrations/0014_console_operators.sql).
SELECT operator, reinstated FROM console_operator_add(%(name)s::text, %(token)s::text);

-- name: operator_revoke
SELECT console_operator_revoke(%(name)s::text) AS sessions_ended;

-- name: operator_list
SELECT o.name, o.created_at, o.created_by, o.token_issued_at, o.revoked_at, o.revoked_by,
       count(s.id_hash) FILTER (WHERE s.ended_at IS NULL AND s.expires_at > now())
           AS live_sessions,
       max(s.signed_in_at) AS last_sign_in
FROM console_operators o
LEFT JOIN console_sessions s ON s.operator_id = o.id
GROUP BY o.id
ORDER BY o.revoked_at IS NOT NULL, lower(o.name);

-- name: trigger_states
SELECT t.tgname AS name, c.relname AS table_name, t.tgenabled <> 'D' AS enabled
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND NOT t.tgisinternal;

-- name: live_workers
SELECT count(*) AS listeners FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'koding-caravan-listen';

-- name: oldest_backlog
SELECT stage, extract(epoch FROM oldest_waiting)::float8 AS seconds
FROM stage_overview WHERE oldest_waiting IS NOT NULL;

-- name: database_access
-- Whether any login may connect (PUBLIC has CONNECT), which migration 0015 took away.
SELECT current_database() AS database,
       has_database_privilege('public', current_database(), 'CONNECT') AS public_may_connect;

-- name: move_request
-- One session to another local date and time (sql/migrations/0018_session_moves.sql): checked
-- at once; refused with the reason, changing nothing. session: the console's session id.
SELECT request_session_move(%(session_id)s::uuid, %(new_date)s::date, %(new_time)s::text,
                            %(request_type)s::text, %(reason)s::text, %(notes)s::text,
                            %(session)s::text) AS request_id;

-- name: move_approve
SELECT approve_session_move(%(request_id)s::uuid, %(substitute)s::boolean,
                            %(session)s::text) AS outcome;

-- name: move_reject
SELECT reject_session_move(%(request_id)s::uuid, %(reason)s::text, %(session)s::text)
    AS outcome;

-- name: move_cancel
SELECT cancel_session_move(%(request_id)s::uuid, %(session)s::text) AS outcome;

-- name: move_status
SELECT id, status, reviewed_by, outcome, rejection_reason
FROM trainer_reschedules WHERE id = %(request_id)s::uuid;

-- name: moves_list
-- Requests to move one session, the pending first (oldest first), then the latest decided.
SELECT r.id, r.status, r.request_type AS asked_for, r.requested_by, st.full_name AS student,
       ts.session_number AS session, t.full_name AS trainer,
       to_char(r.original_date, 'Dy DD Mon') || ' ' || to_char(r.original_time, 'HH24:MI')
           AS from_time,
       to_char(r.new_date, 'Dy DD Mon') || ' ' || to_char(r.new_time, 'HH24:MI') AS to_time,
       r.reason, r.created_at, r.reviewed_by,
       coalesce(r.rejection_reason, r.outcome) AS outcome
FROM trainer_reschedules r
JOIN students st ON st.id = r.student_id
JOIN tutoring_sessions ts ON ts.id = r.session_id
JOIN trainers t ON t.id = r.trainer_id
WHERE %(status)s::text IS NULL OR r.status = %(status)s::text
ORDER BY r.status <> 'pending', CASE WHEN r.status = 'pending' THEN r.created_at END,
         r.reviewed_at DESC
LIMIT %(limit)s::integer;
