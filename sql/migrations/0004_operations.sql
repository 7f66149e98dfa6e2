-- 0004 operations: views to answer "where is it, and why?", SQL replays, attempt counting
-- that survives worker crashes, retention, queue autovacuum.

-- Every start of a job, counted before the stage runs and committed on its own: an attempt
-- cut short by a worker crash still counts (pgqueuer re-picks such a job without counting).
CREATE TABLE job_starts (
    job_id           bigint PRIMARY KEY,
    stage            text NOT NULL,
    ref_id           uuid NOT NULL,
    starts           integer NOT NULL DEFAULT 1,
    first_started_at timestamptz NOT NULL DEFAULT now(),
    last_started_at  timestamptz NOT NULL DEFAULT now(),
    last_worker      uuid
);

CREATE FUNCTION record_job_start(p_job bigint, p_stage text, p_ref uuid, p_worker uuid)
RETURNS integer
LANGUAGE sql
AS $$
    INSERT INTO job_starts (job_id, stage, ref_id, last_worker)
    VALUES (p_job, p_stage, p_ref, p_worker)
    ON CONFLICT (job_id) DO UPDATE
    SET starts = job_starts.starts + 1, last_started_at = now(), last_worker = p_worker
    RETURNING starts
$$;

-- The queue is a hot, small, churning table: vacuum it early and often.
ALTER TABLE pgqueuer SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0,
    fillfactor = 70
);

-------------------------------------------------------------------------------------------------
-- Views
-------------------------------------------------------------------------------------------------

-- Each job of this project (live or held as failed) with the row it concerns.
CREATE VIEW stage_jobs AS
SELECT j.id AS job_id, j.entrypoint AS stage,
       substr(j.dedupe_key, length(j.entrypoint) + 2)::uuid AS ref_id,
       j.status::text AS status, j.created AS enqueued_at, j.execute_after, j.updated,
       j.heartbeat, j.queue_manager_id, j.attempts AS retries,
       coalesce(s.starts, 0) AS starts
FROM pgqueuer j
LEFT JOIN job_starts s ON s.job_id = j.id
WHERE j.entrypoint IN ('purchase', 'allocation', 'sessions') AND j.dedupe_key IS NOT NULL;

-- The latest event of each (stage, row) from the history.
CREATE VIEW stage_last_event AS
SELECT DISTINCT ON (stage, ref_id) stage, ref_id, event, detail, error, at
FROM stage_history
ORDER BY stage, ref_id, at DESC, id DESC;

-- The latest failure message of each (stage, row).
CREATE VIEW stage_last_error AS
SELECT DISTINCT ON (stage, ref_id) stage, ref_id, detail AS error, error AS error_detail, at
FROM stage_history
WHERE event = 'failed'
ORDER BY stage, ref_id, at DESC, id DESC;

-- One row per payment: every stage, its time, its job's state, attempts and last error.
-- Filter by payment_id, purchase_id, student_id or course_id.
CREATE VIEW purchase_trace AS
SELECT p.id AS payment_id, p.student_id, p.course_id, p.status AS payment_status,
       p.updated_at AS payment_at,
       pj.status AS purchase_job, pj.starts AS purchase_attempts, pe.error AS purchase_error,
       rj.reason AS rejected_reason, rj.errors AS rejected_errors,
       pu.id AS purchase_id, pu.created_at AS purchase_at, pu.purchase_tier, pu.is_active,
       aj.status AS allocation_job, aj.starts AS allocation_attempts, ae.error AS allocation_error,
       ta.id AS allocation_id, ta.status AS allocation_status, ta.trainer_id,
       ta.reason AS allocation_reason, ta.reason_detail AS allocation_reason_detail,
       ta.attempts AS allocation_tries, ta.allocated_at,
       sj.status AS sessions_job, sj.starts AS sessions_attempts, se.error AS sessions_error,
       ss.written AS sessions_written, ss.first_at AS first_session_at,
       ss.written_at AS sessions_at
FROM payments p
LEFT JOIN student_course_purchases pu ON pu.payment_id = p.id
LEFT JOIN payment_rejections rj ON rj.payment_id = p.id AND rj.resolved_at IS NULL
LEFT JOIN LATERAL (
    SELECT * FROM trainer_allocations a WHERE a.purchase_id = pu.id
    ORDER BY (a.status IN ('pending', 'approved')) DESC, a.created_at DESC LIMIT 1
) ta ON true
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE s.status <> 'cancelled') AS written,
           min(s.starts_at) FILTER (WHERE s.status <> 'cancelled') AS first_at,
           max(s.created_at) AS written_at
    FROM tutoring_sessions s
    JOIN trainer_allocations a2 ON a2.id = s.allocation_id
    WHERE a2.purchase_id = pu.id
) ss ON pu.id IS NOT NULL
LEFT JOIN stage_jobs pj ON pj.stage = 'purchase' AND pj.ref_id = p.id
LEFT JOIN stage_jobs aj ON aj.stage = 'allocation' AND aj.ref_id = pu.id
LEFT JOIN stage_jobs sj ON sj.stage = 'sessions' AND sj.ref_id = ta.id
LEFT JOIN stage_last_error pe ON pe.stage = 'purchase' AND pe.ref_id = p.id
     AND pe.at >= p.updated_at
LEFT JOIN stage_last_error ae ON ae.stage = 'allocation' AND ae.ref_id = pu.id
     AND ae.at >= pu.created_at
LEFT JOIN stage_last_error se ON se.stage = 'sessions' AND se.ref_id = ta.id
     AND se.at >= ta.created_at;

-- Per stage: queued, in flight, failed, oldest waiting age, and p50/p95 latency from the
-- enqueue to the stage's outcome over the last hour.
CREATE VIEW stage_overview AS
WITH stages(stage) AS (VALUES ('purchase'), ('allocation'), ('sessions')),
jobs AS (
    SELECT stage,
           count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status = 'picked') AS in_flight,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           max(now() - enqueued_at) FILTER (WHERE status = 'queued') AS oldest_waiting
    FROM stage_jobs GROUP BY stage
),
latency AS (
    SELECT done.stage, done.at - started.at AS took
    FROM stage_history done
    CROSS JOIN LATERAL (
        SELECT e.at FROM stage_history e
        WHERE e.stage = done.stage AND e.ref_id = done.ref_id
          AND e.event IN ('enqueued', 'replayed', 'healed') AND e.at <= done.at
        ORDER BY e.at DESC LIMIT 1
    ) started
    WHERE done.event IN ('succeeded', 'skipped', 'rejected')
      AND done.at > now() - interval '1 hour'
)
SELECT s.stage,
       coalesce(j.queued, 0) AS queued,
       coalesce(j.in_flight, 0) AS in_flight,
       coalesce(j.failed, 0) AS failed,
       j.oldest_waiting,
       (SELECT count(*) FROM latency l WHERE l.stage = s.stage) AS done_last_hour,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY l.took)
          FROM latency l WHERE l.stage = s.stage) AS p50_latency,
       (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY l.took)
          FROM latency l WHERE l.stage = s.stage) AS p95_latency
FROM stages s
LEFT JOIN jobs j ON j.stage = s.stage
ORDER BY array_position(ARRAY['purchase', 'allocation', 'sessions'], s.stage);

-- Failed jobs (held after their last attempt) with the error, the traceback and the row.
CREATE VIEW failed_jobs AS
SELECT j.job_id, j.stage, j.ref_id, j.starts AS attempts, j.updated AS failed_at,
       e.error, e.error_detail ->> 'type' AS error_type,
       coalesce(e.error_detail ->> 'traceback', tb.traceback ->> 'traceback') AS traceback,
       CASE j.stage
           WHEN 'purchase' THEN (SELECT to_jsonb(p) - 'metadata' || jsonb_build_object(
                                     'metadata', p.metadata)
                                 FROM payments p WHERE p.id = j.ref_id)
           WHEN 'allocation' THEN (SELECT to_jsonb(pu) FROM student_course_purchases pu
                                   WHERE pu.id = j.ref_id)
           WHEN 'sessions' THEN (SELECT to_jsonb(ta) - 'metadata' FROM trainer_allocations ta
                                 WHERE ta.id = j.ref_id)
       END AS row_data
FROM stage_jobs j
LEFT JOIN stage_last_error e ON e.stage = j.stage AND e.ref_id = j.ref_id
LEFT JOIN LATERAL (
    SELECT l.traceback FROM pgqueuer_log l
    WHERE l.job_id = j.job_id AND l.traceback IS NOT NULL
    ORDER BY l.created DESC LIMIT 1
) tb ON true
WHERE j.status = 'failed';

-- Rows older than p_older_than whose next stage is missing, with what is holding them.
CREATE FUNCTION stuck_rows(p_older_than interval DEFAULT interval '10 minutes')
RETURNS TABLE (stage text, ref_id uuid, since timestamptz, waiting_for text, job_status text)
LANGUAGE sql STABLE
AS $$
    SELECT 'purchase', p.id, p.updated_at, 'a purchase', j.status
    FROM payments p
    LEFT JOIN stage_jobs j ON j.stage = 'purchase' AND j.ref_id = p.id
    WHERE p.status = 'succeeded' AND p.updated_at < now() - p_older_than
      AND NOT EXISTS (SELECT 1 FROM student_course_purchases pu WHERE pu.payment_id = p.id)
      AND NOT EXISTS (SELECT 1 FROM purchase_upgrades u WHERE u.payment_id = p.id)
      AND NOT EXISTS (SELECT 1 FROM payment_rejections r
                      WHERE r.payment_id = p.id AND r.resolved_at IS NULL)
    UNION ALL
    SELECT 'allocation', pu.id, pu.created_at,
           CASE WHEN ta.status = 'pending' THEN 'a trainer (' || ta.reason || ')'
                ELSE 'an allocation' END, j.status
    FROM student_course_purchases pu
    LEFT JOIN trainer_allocations ta ON ta.purchase_id = pu.id
         AND ta.status IN ('pending', 'approved')
    LEFT JOIN stage_jobs j ON j.stage = 'allocation' AND j.ref_id = pu.id
    WHERE pu.is_active AND pu.created_at < now() - p_older_than
      AND (ta.id IS NULL OR ta.status = 'pending')
    UNION ALL
    SELECT 'sessions', ta.id, ta.allocated_at, 'its sessions', j.status
    FROM trainer_allocations ta
    LEFT JOIN stage_jobs j ON j.stage = 'sessions' AND j.ref_id = ta.id
    WHERE ta.status = 'approved' AND ta.allocated_at < now() - p_older_than
      AND NOT EXISTS (SELECT 1 FROM tutoring_sessions ts WHERE ts.allocation_id = ta.id)
$$;

CREATE VIEW stuck AS SELECT * FROM stuck_rows();

-------------------------------------------------------------------------------------------------
-- Replays (SECURITY DEFINER: an operator role may run them without rights on the tables)
-------------------------------------------------------------------------------------------------

-- Run one row's stage again: a failed job of it is dropped (it stays in the history and in
-- pgqueuer_log) and a fresh job is enqueued. Idempotent: the stage does nothing twice.
CREATE FUNCTION replay_stage(p_stage text, p_ref uuid)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_failed bigint;
    v_exists boolean;
BEGIN
    IF p_stage NOT IN ('purchase', 'allocation', 'sessions') THEN
        RAISE EXCEPTION 'unknown stage %', p_stage
            USING HINT = 'stages are purchase, allocation and sessions',
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    v_exists := CASE p_stage
        WHEN 'purchase' THEN EXISTS (SELECT 1 FROM payments WHERE id = p_ref)
        WHEN 'allocation' THEN EXISTS (SELECT 1 FROM student_course_purchases WHERE id = p_ref)
        ELSE EXISTS (SELECT 1 FROM trainer_allocations WHERE id = p_ref) END;
    IF NOT v_exists THEN
        RAISE EXCEPTION 'no % row %: purchase takes a payment id, allocation a purchase id, '
                        'sessions an allocation id', p_stage, p_ref
            USING ERRCODE = 'no_data_found';
    END IF;
    DELETE FROM pgqueuer
    WHERE dedupe_key = p_stage || ':' || p_ref AND status = 'failed'
    RETURNING id INTO v_failed;
    IF v_failed IS NOT NULL THEN
        INSERT INTO pgqueuer_log (job_id, status, entrypoint, priority)
        VALUES (v_failed, 'deleted', p_stage, 0);
        DELETE FROM job_starts WHERE job_id = v_failed;
    END IF;
    RETURN enqueue_stage(p_stage, p_ref, 'replayed');
END
$$;

-- Replay every failed job of a stage; returns how many.
CREATE FUNCTION replay_failed(p_stage text)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    SELECT count(replay_stage(stage, ref_id))::integer
    FROM (SELECT stage, ref_id FROM stage_jobs WHERE stage = p_stage AND status = 'failed') f
$$;

-------------------------------------------------------------------------------------------------
-- Retention
-------------------------------------------------------------------------------------------------

-- Delete history and queue log older than p_keep (live jobs' rows are never touched).
CREATE FUNCTION prune_history(p_keep interval)
RETURNS TABLE (history_deleted bigint, log_deleted bigint, starts_deleted bigint)
LANGUAGE sql
AS $$
    WITH h AS (
        DELETE FROM stage_history WHERE at < now() - p_keep RETURNING 1
    ), l AS (
        DELETE FROM pgqueuer_log
        WHERE created < now() - p_keep AND job_id NOT IN (SELECT id FROM pgqueuer)
        RETURNING 1
    ), s AS (
        DELETE FROM job_starts
        WHERE last_started_at < now() - p_keep AND job_id NOT IN (SELECT id FROM pgqueuer)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM h), (SELECT count(*) FROM l), (SELECT count(*) FROM s)
$$;
