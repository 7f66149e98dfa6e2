-- Stage bookkeeping shared by every stage.

-- name: record_history
INSERT INTO stage_history (stage, ref_id, event, job_id, detail, error)
VALUES (%(stage)s::text, %(ref_id)s::uuid, %(event)s::text, %(job_id)s::bigint,
        %(detail)s::text, %(error)s::jsonb);

-- name: enqueue_stage
SELECT enqueue_stage(%(stage)s::text, %(ref_id)s::uuid) AS job_id;
