-- 0011 follow-ups: an enqueue that arrives while the row's job is running is not lost.
-- enqueue_stage dedupes onto the live job of the same row. When that job is already running
-- (pgqueuer status 'picked'), it may have read the row before the change that asked for the
-- enqueue (a session cancelled, a trainer leaving, an admin request, a reschedule): the
-- change was absorbed and waited for the healer or a sweep (minutes), or, for an admin
-- request, for the next job of that purchase. Measured in the lifecycle tests: a session
-- cancelled 30 ms after its schedule was written lost its make-up.
-- Now such an enqueue records a follow-up; when the running job leaves pgqueuer's table
-- (done, or deleted by a replay), a statement trigger enqueues the stage again. Stages are
-- idempotent, so the extra run costs one job and writes nothing twice.

CREATE TABLE stage_followups (
    stage     text NOT NULL CHECK (stage IN ('purchase', 'allocation', 'sessions')),
    ref_id    uuid NOT NULL,
    asked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stage, ref_id)
);

CREATE OR REPLACE FUNCTION enqueue_stage(p_stage text, p_ref uuid,
                                         p_event text DEFAULT 'enqueued',
                                         p_delay interval DEFAULT interval '0')
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_key    text := p_stage || ':' || p_ref;
    v_job_id bigint;
    v_running boolean;
BEGIN
    IF p_stage IS NULL OR p_stage NOT IN ('purchase', 'allocation', 'sessions') THEN
        RAISE EXCEPTION 'unknown stage %', p_stage
            USING HINT = 'stages are purchase, allocation and sessions',
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_ref IS NULL THEN
        RAISE EXCEPTION 'enqueue_stage(%): the row id is NULL', p_stage
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_event IS NULL OR p_event NOT IN ('enqueued', 'replayed', 'healed') THEN
        RAISE EXCEPTION 'enqueue_stage(%): % is not an enqueue event', p_stage, p_event
            USING HINT = 'events are enqueued, replayed and healed',
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_delay IS NULL OR p_delay < interval '0' OR p_delay > interval '1 day' THEN
        RAISE EXCEPTION 'enqueue_stage(%): a delay of % is outside 0 .. 1 day', p_stage, p_delay
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT (CASE p_stage
        WHEN 'purchase' THEN EXISTS (SELECT 1 FROM payments WHERE id = p_ref)
        WHEN 'allocation' THEN EXISTS (SELECT 1 FROM student_course_purchases WHERE id = p_ref)
        ELSE EXISTS (SELECT 1 FROM trainer_allocations WHERE id = p_ref) END)
    THEN
        RAISE EXCEPTION 'enqueue_stage(%): no row %', p_stage, p_ref
            USING HINT = 'purchase takes a payment id, allocation a purchase id, '
                         'sessions an allocation id',
                  ERRCODE = 'no_data_found';
    END IF;

    INSERT INTO pgqueuer (priority, entrypoint, payload, execute_after, dedupe_key, status)
    VALUES (0, p_stage, convert_to(p_ref::text, 'UTF8'), now() + p_delay, v_key, 'queued')
    ON CONFLICT (dedupe_key)
        WHERE status IN ('queued', 'picked') AND dedupe_key IS NOT NULL
        DO NOTHING
    RETURNING id INTO v_job_id;

    IF v_job_id IS NOT NULL THEN
        INSERT INTO pgqueuer_log (job_id, status, entrypoint, priority)
        VALUES (v_job_id, 'queued', p_stage, 0);
    ELSE
        SELECT id, status = 'picked' INTO v_job_id, v_running FROM pgqueuer
        WHERE dedupe_key = v_key AND status IN ('queued', 'picked');
        -- A running job may have read the row before this change: run the stage once more
        -- after it (trg_pgqueuer_followups enqueues it when the running job is gone).
        IF v_running THEN
            INSERT INTO stage_followups (stage, ref_id) VALUES (p_stage, p_ref)
            ON CONFLICT DO NOTHING;
        END IF;
    END IF;

    INSERT INTO stage_history (stage, ref_id, event, job_id)
    VALUES (p_stage, p_ref, p_event, v_job_id);
    RETURN v_job_id;
END
$$;


CREATE FUNCTION trg_pgqueuer_followups() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_enqueued integer;
BEGIN
    WITH due AS (
        DELETE FROM stage_followups f
        USING finished j
        WHERE f.stage = j.entrypoint AND f.ref_id = kc_job_ref(j.entrypoint, j.dedupe_key)
        RETURNING f.stage, f.ref_id
    )
    SELECT count(enqueue_stage(due.stage, due.ref_id)) INTO v_enqueued FROM due;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION trg_pgqueuer_followups() FROM PUBLIC;

CREATE TRIGGER pgqueuer_followups
AFTER DELETE ON pgqueuer
REFERENCING OLD TABLE AS finished
FOR EACH STATEMENT EXECUTE FUNCTION trg_pgqueuer_followups();
