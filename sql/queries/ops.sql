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

-- name: trace_rows
SELECT * FROM purchase_trace
WHERE %(id)s::uuid IN (payment_id, purchase_id, allocation_id, student_id, course_id)
ORDER BY payment_at;

-- name: trace_history
SELECT h.at, h.stage, h.event, h.ref_id, h.job_id, h.detail
FROM stage_history h
WHERE h.ref_id = ANY (%(refs)s::uuid[])
ORDER BY h.at, h.id;

-- name: failures
SELECT job_id, stage, ref_id, attempts, failed_at, error_type, error FROM failed_jobs
ORDER BY failed_at;

-- name: replay_stage
-- actor: who asks (stage_history.actor); NULL names the database login.
SELECT replay_stage(%(stage)s::text, %(ref_id)s::uuid, %(actor)s::text) AS job_id;

-- name: replay_failed
SELECT replay_failed(%(stage)s::text, %(actor)s::text) AS replayed;

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
