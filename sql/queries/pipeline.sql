-- Stage bookkeeping shared by every stage.

-- name: holidays_from
-- Days without sessions; every stage that plans a schedule reads them (stages.load_holidays).
SELECT day FROM holidays WHERE day >= %(from_day)s::date ORDER BY day;

-- name: enqueue_stage
SELECT enqueue_stage(%(stage)s::text, %(ref_id)s::uuid) AS job_id;

-- name: sweep_pending
SELECT sweep_pending_allocations(%(min_age)s::interval) AS enqueued;

-- name: request_assignment
SELECT assign_trainer(%(purchase_id)s::uuid, %(trainer_id)s::uuid, %(override)s::boolean,
                      %(note)s::text, %(session)s::text) AS request_id;

-- name: request_status
SELECT id, status, outcome, allocation_id FROM allocation_requests
WHERE id = %(request_id)s::bigint;

-- name: heal_pipeline
SELECT stage, ref_id FROM heal_pipeline(%(min_age)s::interval);

-- name: prune_history
SELECT history_deleted, log_deleted, starts_deleted FROM prune_history(%(keep)s::interval);

-- name: record_history_many
-- A batch's history lines (one per row) in one statement.
INSERT INTO stage_history (stage, ref_id, event, job_id, detail, error)
SELECT %(stage)s::text, t.ref_id, t.event, t.job_id, t.detail, t.error
FROM unnest(%(refs)s::uuid[], %(events)s::text[], %(job_ids)s::bigint[], %(details)s::text[],
            %(errors)s::jsonb[]) AS t(ref_id, event, job_id, detail, error);

-- name: record_job_starts
-- Every job of a batch counted as started, before its work runs (one statement; see
-- record_job_start for the one-job form).
INSERT INTO job_starts (job_id, stage, ref_id, last_worker)
SELECT t.job_id, %(stage)s::text, t.ref_id, %(worker)s::uuid
FROM unnest(%(job_ids)s::bigint[], %(refs)s::uuid[]) AS t(job_id, ref_id)
ON CONFLICT (job_id) DO UPDATE
SET starts = job_starts.starts + 1, last_started_at = now(), last_worker = EXCLUDED.last_worker
RETURNING job_id, starts;
