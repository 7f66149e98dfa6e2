-- 0016 When trainers are scarce (issue 22; issue 21, item 10).
--
-- Measured on 0013 (bench/scarce.py: 200 payments in one transaction, 20 trainers, two
-- workers): the sessions of approved purchases were written 108 s after their approval, the
-- workers busy with retries of allocations that had failed on deadlocks; two changes that
-- could help the 82 waiting purchases (a new trainer with their week, one trainer's week
-- rewritten) wrote 15.4 `enqueued` history lines for each of them.
--
--   * Jobs have priorities (pgqueuer dequeues by priority, then id): a stage that finishes
--     work for a student comes first (sessions 30, allocation 20, purchase 10), and another
--     try for a purchase that waits for a trainer comes last (0), so a pile of retries never
--     delays fresh payments or the sessions of an approved allocation. An enqueue that a
--     queued job absorbs raises that job's priority when it asks for more.
--   * enqueue_stage writes its history line only when it created a job (an operator's
--     replay is always recorded): a change absorbed by a job that exists says nothing.
--   * The retry triggers fire once per statement (transition tables), and each waiting
--     purchase that a changed trainer could teach is enqueued once, whatever the number of
--     rows or trainers the statement changed.

-------------------------------------------------------------------------------------------------
-- Priorities and history
-------------------------------------------------------------------------------------------------

-- The priority of a job for this stage and row: later stages first; another try for a
-- purchase that waits for a trainer (its live allocation is pending, and no admin request or
-- reschedule is open for it) last. A replay is what an operator asked for: the stage's own.
CREATE FUNCTION kc_job_priority(p_stage text, p_ref uuid, p_event text) RETURNS integer
LANGUAGE sql STABLE
AS $$
    SELECT CASE
        WHEN p_stage = 'sessions' THEN 30
        WHEN p_stage = 'purchase' THEN 10
        WHEN p_event = 'enqueued'
             AND EXISTS (SELECT 1 FROM trainer_allocations ta
                         WHERE ta.purchase_id = p_ref AND ta.status = 'pending')
             AND NOT EXISTS (SELECT 1 FROM allocation_requests r
                             WHERE r.purchase_id = p_ref AND r.status = 'open')
             AND NOT EXISTS (SELECT 1 FROM schedule_changes sc
                             WHERE sc.purchase_id = p_ref AND sc.status = 'open')
        THEN 0
        ELSE 20
    END
$$;
REVOKE EXECUTE ON FUNCTION kc_job_priority(text, uuid, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION enqueue_stage(p_stage text, p_ref uuid,
                                         p_event text DEFAULT 'enqueued',
                                         p_delay interval DEFAULT interval '0')
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_key      text := p_stage || ':' || p_ref;
    v_job_id   bigint;
    v_running  boolean;
    v_priority integer;
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
    v_priority := kc_job_priority(p_stage, p_ref, p_event);

    INSERT INTO pgqueuer (priority, entrypoint, payload, execute_after, dedupe_key, status)
    VALUES (v_priority, p_stage, convert_to(p_ref::text, 'UTF8'), now() + p_delay, v_key,
            'queued')
    ON CONFLICT (dedupe_key)
        WHERE status IN ('queued', 'picked') AND dedupe_key IS NOT NULL
        DO NOTHING
    RETURNING id INTO v_job_id;

    IF v_job_id IS NOT NULL THEN
        INSERT INTO pgqueuer_log (job_id, status, entrypoint, priority)
        VALUES (v_job_id, 'queued', p_stage, v_priority);
        INSERT INTO stage_history (stage, ref_id, event, job_id)
        VALUES (p_stage, p_ref, p_event, v_job_id);
        RETURN v_job_id;
    END IF;

    -- Absorbed by the job that exists: it does what was asked, sooner when asked for more.
    SELECT id, status = 'picked' INTO v_job_id, v_running FROM pgqueuer
    WHERE dedupe_key = v_key AND status IN ('queued', 'picked');
    IF v_running THEN
        -- A running job may have read the row before this change: run the stage once more
        -- after it (trg_pgqueuer_followups enqueues it when the running job is gone).
        INSERT INTO stage_followups (stage, ref_id) VALUES (p_stage, p_ref)
        ON CONFLICT DO NOTHING;
    ELSE
        UPDATE pgqueuer SET priority = v_priority
        WHERE id = v_job_id AND status = 'queued' AND priority < v_priority;
    END IF;
    IF p_event = 'replayed' THEN  -- an operator's act is history, with its actor
        INSERT INTO stage_history (stage, ref_id, event, job_id)
        VALUES (p_stage, p_ref, p_event, v_job_id);
    END IF;
    RETURN v_job_id;
END
$$;

-------------------------------------------------------------------------------------------------
-- Retries of waiting purchases: once per statement, once per purchase
-------------------------------------------------------------------------------------------------

-- Every waiting purchase that one of these trainers could teach (active, teaching the
-- course) enqueued once, in purchase order (two statements retrying the same purchases
-- insert their jobs in the same order); NULL: every waiting purchase. A purchase whose job
-- is held as failed is left alone (an operator replays it).
CREATE FUNCTION kc_retry_pending(p_trainers uuid[]) RETURNS integer
LANGUAGE sql
AS $$
    SELECT count(enqueue_stage('allocation', due.purchase_id))::integer
    FROM (
        SELECT ta.purchase_id
        FROM trainer_allocations ta
        JOIN courses c ON c.id = ta.course_id
        WHERE ta.status = 'pending'
          AND NOT EXISTS (SELECT 1 FROM pgqueuer j
                          WHERE j.dedupe_key = 'allocation:' || ta.purchase_id
                            AND j.status = 'failed')
          AND (p_trainers IS NULL OR EXISTS (
                SELECT 1 FROM trainers t
                WHERE t.id = ANY (p_trainers) AND t.status = 'active'
                  AND t.specialties_norm && array_remove(
                        ARRAY[lower(btrim(c.category)), lower(btrim(c.subcategory))], NULL)))
        ORDER BY ta.purchase_id
    ) due
$$;
REVOKE EXECUTE ON FUNCTION kc_retry_pending(uuid[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION retry_pending_allocations(p_trainer uuid DEFAULT NULL)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$ SELECT kc_retry_pending(CASE WHEN p_trainer IS NOT NULL THEN ARRAY[p_trainer] END) $$;

-- Capacity freed: approved allocations that ended (cancelled, completed) in one statement.
DROP TRIGGER trainer_allocations_retry_pending ON trainer_allocations;
CREATE OR REPLACE FUNCTION trg_allocations_retry_pending() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_trainers uuid[] := ARRAY(
        SELECT DISTINCT o.trainer_id
        FROM old_allocations o JOIN new_allocations n ON n.id = o.id
        WHERE o.status = 'approved' AND n.status IN ('cancelled', 'completed')
          AND o.trainer_id IS NOT NULL);
BEGIN
    IF cardinality(v_trainers) > 0 THEN
        PERFORM kc_retry_pending(v_trainers);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER trainer_allocations_retry_pending
    AFTER UPDATE ON trainer_allocations
    REFERENCING OLD TABLE AS old_allocations NEW TABLE AS new_allocations
    FOR EACH STATEMENT EXECUTE FUNCTION trg_allocations_retry_pending();

-- Availability added or changed (a trigger with a transition table has one event).
DROP TRIGGER trainer_availability_retry_pending ON trainer_availability;
CREATE OR REPLACE FUNCTION trg_availability_retry_pending() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_retry_pending(ARRAY(SELECT DISTINCT trainer_id FROM new_availability));
    RETURN NULL;
END
$$;
CREATE TRIGGER trainer_availability_added_retry_pending
    AFTER INSERT ON trainer_availability
    REFERENCING NEW TABLE AS new_availability
    FOR EACH STATEMENT EXECUTE FUNCTION trg_availability_retry_pending();
CREATE TRIGGER trainer_availability_changed_retry_pending
    AFTER UPDATE ON trainer_availability
    REFERENCING NEW TABLE AS new_availability
    FOR EACH STATEMENT EXECUTE FUNCTION trg_availability_retry_pending();

-- A trainer added, or changed in a way that may let them teach someone new.
DROP TRIGGER trainers_retry_pending ON trainers;
CREATE OR REPLACE FUNCTION trg_trainers_retry_pending() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_trainers uuid[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        v_trainers := ARRAY(SELECT id FROM new_trainers WHERE status = 'active');
    ELSE
        v_trainers := ARRAY(
            SELECT n.id FROM new_trainers n JOIN old_trainers o ON o.id = n.id
            WHERE n.status = 'active'
              AND (o.status, o.specialties, o.service_radius_km, o.base_lat, o.base_lng,
                   o.rating, o.gender)
                  IS DISTINCT FROM (n.status, n.specialties, n.service_radius_km, n.base_lat,
                                    n.base_lng, n.rating, n.gender));
    END IF;
    IF cardinality(v_trainers) > 0 THEN
        PERFORM kc_retry_pending(v_trainers);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER trainers_added_retry_pending
    AFTER INSERT ON trainers
    REFERENCING NEW TABLE AS new_trainers
    FOR EACH STATEMENT EXECUTE FUNCTION trg_trainers_retry_pending();
CREATE TRIGGER trainers_changed_retry_pending
    AFTER UPDATE ON trainers
    REFERENCING OLD TABLE AS old_trainers NEW TABLE AS new_trainers
    FOR EACH STATEMENT EXECUTE FUNCTION trg_trainers_retry_pending();

-- Sessions cancelled (their time is free again): once per statement, not once per trainer.
CREATE OR REPLACE FUNCTION trg_sessions_retry_pending() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_trainers uuid[] := ARRAY(
        SELECT DISTINCT trainer_id FROM updated_sessions WHERE status = 'cancelled');
BEGIN
    IF cardinality(v_trainers) > 0 THEN
        PERFORM kc_retry_pending(v_trainers);
    END IF;
    RETURN NULL;
END
$$;

-- Trigger functions are not called directly; the closed ones stay closed.
REVOKE EXECUTE ON FUNCTION trg_allocations_retry_pending(), trg_availability_retry_pending(),
    trg_trainers_retry_pending(), trg_sessions_retry_pending(),
    retry_pending_allocations(uuid) FROM PUBLIC;
