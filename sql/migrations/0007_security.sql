-- 0007 security and bad input.
-- Before this revision apply_refund, enqueue_stage and retry_pending_allocations ran with the
-- owner's rights and were executable by PUBLIC: a login with no grants at all could cancel a
-- paid course, park any row's job for a century, forge history and flood the queue.
--   * every SECURITY DEFINER function is closed to PUBLIC and granted to the one role that
--     needs it (a test fails on any SECURITY DEFINER function PUBLIC may execute);
--   * the trigger functions that call them run as the owner themselves, so whoever writes a
--     payment or a trainer still starts the pipeline without any right on the queue;
--   * the functions check their input: a refund only for a refunded payment; an enqueue only
--     for a row that exists, with a known event and a bounded delay;
--   * a capacity override needs the admin request behind it (checked by the database);
--   * one open admin request per purchase: a newer request supersedes the older one;
--   * jobs in pgqueuer's table that are not the pipeline's are ignored, not cast;
--   * the sweep and the retry triggers leave alone a row whose job is held as failed.

-------------------------------------------------------------------------------------------------
-- Which pgqueuer jobs are the pipeline's
-------------------------------------------------------------------------------------------------

-- The row id of one of the pipeline's jobs ('<stage>:<uuid>'), or NULL for anything else in
-- pgqueuer's table (another application's job must not break the views or the healer).
CREATE FUNCTION kc_job_ref(p_entrypoint text, p_dedupe_key text) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN p_entrypoint IN ('purchase', 'allocation', 'sessions')
         AND p_dedupe_key ~ ('^' || p_entrypoint
                             || ':[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$')
        THEN substr(p_dedupe_key, length(p_entrypoint) + 2)::uuid
    END
$$;

CREATE OR REPLACE VIEW live_jobs AS
SELECT id AS job_id, entrypoint AS stage, kc_job_ref(entrypoint, dedupe_key) AS ref_id, status,
       attempts
FROM pgqueuer
WHERE status IN ('queued', 'picked') AND kc_job_ref(entrypoint, dedupe_key) IS NOT NULL;

CREATE OR REPLACE VIEW stage_jobs AS
SELECT j.id AS job_id, j.entrypoint AS stage,
       kc_job_ref(j.entrypoint, j.dedupe_key) AS ref_id,
       j.status::text AS status, j.created AS enqueued_at, j.execute_after, j.updated,
       j.heartbeat, j.queue_manager_id, j.attempts AS retries,
       coalesce(s.starts, 0) AS starts
FROM pgqueuer j
LEFT JOIN job_starts s ON s.job_id = j.id
WHERE kc_job_ref(j.entrypoint, j.dedupe_key) IS NOT NULL;

-------------------------------------------------------------------------------------------------
-- enqueue_stage: only for rows that exist, known events, bounded delays
-------------------------------------------------------------------------------------------------

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
        SELECT id INTO v_job_id FROM pgqueuer
        WHERE dedupe_key = v_key AND status IN ('queued', 'picked');
    END IF;

    INSERT INTO stage_history (stage, ref_id, event, job_id)
    VALUES (p_stage, p_ref, p_event, v_job_id);
    RETURN v_job_id;
END
$$;

-------------------------------------------------------------------------------------------------
-- apply_refund: only for a payment that is really refunded
-------------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION kc_require_refunded(p_payment uuid) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_status text;
BEGIN
    SELECT status INTO v_status FROM payments WHERE id = p_payment;
    IF v_status IS DISTINCT FROM 'refunded' THEN
        RAISE EXCEPTION 'apply_refund(%): the payment is %, not refunded', p_payment,
            coalesce(v_status, 'missing')
            USING HINT = 'a refund takes effect when payments.status becomes refunded',
                  ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- The body of 0003's apply_refund is kept; the check runs first.
ALTER FUNCTION apply_refund(uuid) RENAME TO kc_apply_refund_unchecked;
REVOKE EXECUTE ON FUNCTION kc_apply_refund_unchecked(uuid) FROM PUBLIC;

CREATE FUNCTION apply_refund(p_payment uuid) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_require_refunded(p_payment);
    RETURN kc_apply_refund_unchecked(p_payment);
END
$$;

-------------------------------------------------------------------------------------------------
-- Retries leave held (failed) jobs to the operator
-------------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION retry_pending_allocations(p_trainer uuid DEFAULT NULL)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    SELECT count(enqueue_stage('allocation', ta.purchase_id))::integer
    FROM trainer_allocations ta
    JOIN courses c ON c.id = ta.course_id
    WHERE ta.status = 'pending'
      AND NOT EXISTS (SELECT 1 FROM pgqueuer j
                      WHERE j.dedupe_key = 'allocation:' || ta.purchase_id
                        AND j.status = 'failed')
      AND (p_trainer IS NULL OR EXISTS (
            SELECT 1 FROM trainers t
            WHERE t.id = p_trainer AND t.status = 'active'
              AND t.specialties_norm && array_remove(
                    ARRAY[lower(btrim(c.category)), lower(btrim(c.subcategory))], NULL)))
$$;

CREATE OR REPLACE FUNCTION sweep_pending_allocations(
    p_min_age interval DEFAULT interval '5 minutes', p_limit integer DEFAULT 500)
RETURNS integer
LANGUAGE sql
AS $$
    SELECT count(enqueue_stage('allocation', due.purchase_id))::integer
    FROM (
        SELECT ta.purchase_id FROM trainer_allocations ta
        WHERE ta.status = 'pending'
          AND ta.updated_at < now() - least(p_min_age * power(2, least(ta.attempts - 1, 20)),
                                            interval '1 day')
          AND NOT EXISTS (SELECT 1 FROM pgqueuer j
                          WHERE j.dedupe_key = 'allocation:' || ta.purchase_id
                            AND j.status = 'failed')
        ORDER BY ta.updated_at
        LIMIT p_limit
    ) due
$$;

-------------------------------------------------------------------------------------------------
-- The healer ignores foreign jobs
-------------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION heal_pipeline(p_min_age interval DEFAULT interval '2 minutes')
RETURNS TABLE (stage text, ref_id uuid)
LANGUAGE sql
AS $$
    WITH held AS (
        SELECT entrypoint AS stage, kc_job_ref(entrypoint, dedupe_key) AS ref_id
        FROM pgqueuer WHERE kc_job_ref(entrypoint, dedupe_key) IS NOT NULL
    ), missing AS (
        -- a succeeded payment with no purchase, no open rejection and no upgrade record
        SELECT 'purchase' AS stage, p.id AS ref_id
        FROM payments p
        WHERE p.status = 'succeeded' AND p.updated_at < now() - p_min_age
          AND NOT EXISTS (SELECT 1 FROM student_course_purchases pu WHERE pu.payment_id = p.id)
          AND NOT EXISTS (SELECT 1 FROM purchase_upgrades u WHERE u.payment_id = p.id)
          AND NOT EXISTS (SELECT 1 FROM payment_rejections r
                          WHERE r.payment_id = p.id AND r.resolved_at IS NULL)
        UNION ALL
        -- an active purchase with no live allocation, or approved but short of sessions
        SELECT 'allocation', pu.id
        FROM student_course_purchases pu
        WHERE pu.is_active AND pu.created_at < now() - p_min_age
          AND (NOT EXISTS (SELECT 1 FROM trainer_allocations ta
                           WHERE ta.purchase_id = pu.id AND ta.status IN ('pending', 'approved'))
               OR EXISTS (SELECT 1 FROM trainer_allocations ta
                          WHERE ta.purchase_id = pu.id AND ta.status = 'approved'
                            AND ta.allocated_at < now() - p_min_age
                            AND EXISTS (SELECT 1 FROM tutoring_sessions ts
                                        WHERE ts.allocation_id = ta.id)
                            AND (SELECT count(*) FROM tutoring_sessions ts
                                 JOIN trainer_allocations a2 ON a2.id = ts.allocation_id
                                 WHERE a2.purchase_id = pu.id AND ts.status <> 'cancelled')
                                < pu.purchase_tier))
        UNION ALL
        -- an approved allocation without any session
        SELECT 'sessions', ta.id
        FROM trainer_allocations ta
        WHERE ta.status = 'approved' AND ta.allocated_at < now() - p_min_age
          AND NOT EXISTS (SELECT 1 FROM tutoring_sessions ts WHERE ts.allocation_id = ta.id)
    )
    , todo AS MATERIALIZED (
        SELECT m.stage, m.ref_id
        FROM missing m
        WHERE NOT EXISTS (SELECT 1 FROM held h WHERE h.stage = m.stage AND h.ref_id = m.ref_id)
    )
    SELECT t.stage, t.ref_id
    FROM todo t
    CROSS JOIN LATERAL (SELECT enqueue_stage(t.stage, t.ref_id, 'healed')) AS enqueued
$$;

-------------------------------------------------------------------------------------------------
-- replay_stage also wakes a live job that is parked in the future
-------------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION replay_stage(p_stage text, p_ref uuid)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_failed bigint;
    v_exists boolean;
BEGIN
    IF p_stage IS NULL OR p_stage NOT IN ('purchase', 'allocation', 'sessions') THEN
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
    -- A queued job waiting for a later time (a retry's backoff, or a job parked on purpose)
    -- runs now: the replay is what the operator asked for.
    UPDATE pgqueuer SET execute_after = now()
    WHERE dedupe_key = p_stage || ':' || p_ref AND status = 'queued' AND execute_after > now();
    RETURN enqueue_stage(p_stage, p_ref, 'replayed');
END
$$;

-------------------------------------------------------------------------------------------------
-- Admin requests: one open per purchase; capacity overrides only with a request behind them
-------------------------------------------------------------------------------------------------

ALTER TABLE allocation_requests
    DROP CONSTRAINT allocation_requests_status_check,
    ADD CONSTRAINT allocation_requests_status_check
        CHECK (status IN ('open', 'done', 'refused', 'superseded'));

-- Older open requests of a purchase (possible before this revision) are superseded by its
-- newest one, as assign_trainer does from now on.
UPDATE allocation_requests r
SET status = 'superseded', decided_at = now(),
    outcome = 'superseded by request ' || newest.id
FROM (SELECT DISTINCT ON (purchase_id) purchase_id, id FROM allocation_requests
      WHERE status = 'open' ORDER BY purchase_id, id DESC) newest
WHERE r.purchase_id = newest.purchase_id AND r.status = 'open' AND r.id < newest.id;

DROP INDEX allocation_requests_open_idx;
CREATE UNIQUE INDEX allocation_requests_one_open_idx ON allocation_requests (purchase_id)
    WHERE status = 'open';

CREATE OR REPLACE FUNCTION assign_trainer(p_purchase uuid, p_trainer uuid,
                                          p_override boolean DEFAULT false,
                                          p_note text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_request    bigint;
    v_superseded bigint[];
BEGIN
    -- The purchase's lock orders this request after an allocation job in flight for it.
    PERFORM 1 FROM student_course_purchases WHERE id = p_purchase AND is_active FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no active purchase %', p_purchase USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM trainers WHERE id = p_trainer) THEN
        RAISE EXCEPTION 'no trainer %', p_trainer USING ERRCODE = 'no_data_found';
    END IF;
    IF p_override IS NULL THEN
        RAISE EXCEPTION 'override must be true or false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_override AND nullif(btrim(p_note), '') IS NULL THEN
        RAISE EXCEPTION 'an override needs a note saying why'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH closed AS (
        UPDATE allocation_requests SET status = 'superseded', decided_at = now()
        WHERE purchase_id = p_purchase AND status = 'open'
        RETURNING id
    )
    SELECT array_agg(id) INTO v_superseded FROM closed;
    INSERT INTO allocation_requests (purchase_id, trainer_id, override, note)
    VALUES (p_purchase, p_trainer, p_override, p_note)
    RETURNING id INTO v_request;
    UPDATE allocation_requests SET outcome = 'superseded by request ' || v_request
    WHERE id = ANY (v_superseded);
    PERFORM enqueue_stage('allocation', p_purchase);
    RETURN v_request;
END
$$;

CREATE OR REPLACE FUNCTION trg_allocations_check_capacity() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_rating numeric;
    v_live   integer;
BEGIN
    IF NEW.status <> 'approved' OR NEW.trainer_id IS NULL THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = 'approved'
       AND OLD.trainer_id IS NOT DISTINCT FROM NEW.trainer_id
       AND OLD.capacity_override = NEW.capacity_override THEN
        RETURN NEW;
    END IF;
    IF NEW.capacity_override THEN
        -- Only an admin's override request for this purchase and trainer, being carried out
        -- in this transaction (it is closed in the same one), may set the rule aside.
        IF NOT EXISTS (SELECT 1 FROM allocation_requests r
                       WHERE r.purchase_id = NEW.purchase_id AND r.trainer_id = NEW.trainer_id
                         AND r.override AND r.status = 'open') THEN
            RAISE EXCEPTION 'capacity override for trainer % without an open override request '
                            'for purchase %', NEW.trainer_id, NEW.purchase_id
                USING ERRCODE = 'check_violation', CONSTRAINT = 'trainer_allocations_capacity',
                      HINT = 'use assign_trainer(purchase, trainer, true, note)';
        END IF;
        RETURN NEW;
    END IF;
    PERFORM kc_lock_trainer(NEW.trainer_id);
    SELECT rating INTO v_rating FROM trainers WHERE id = NEW.trainer_id;
    SELECT count(*) INTO v_live FROM trainer_allocations
    WHERE trainer_id = NEW.trainer_id AND status = 'approved' AND id <> NEW.id;
    IF v_live >= kc_trainer_capacity(v_rating) THEN
        RAISE EXCEPTION 'trainer % is at capacity (% of % live allocations)',
            NEW.trainer_id, v_live, kc_trainer_capacity(v_rating)
            USING ERRCODE = 'check_violation', CONSTRAINT = 'trainer_allocations_capacity';
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER trainer_allocations_check_capacity ON trainer_allocations;
CREATE TRIGGER trainer_allocations_check_capacity
BEFORE INSERT OR UPDATE OF status, trainer_id, capacity_override ON trainer_allocations
FOR EACH ROW EXECUTE FUNCTION trg_allocations_check_capacity();

-------------------------------------------------------------------------------------------------
-- Privileges
-------------------------------------------------------------------------------------------------

-- Trigger functions cannot be called directly; as the owner they may call the closed
-- functions below for whoever wrote the row.
ALTER FUNCTION trg_payments_enqueue_purchase() SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION trg_purchases_enqueue_allocation() SECURITY DEFINER
    SET search_path = public, pg_temp;
ALTER FUNCTION trg_allocations_enqueue_sessions() SECURITY DEFINER
    SET search_path = public, pg_temp;
ALTER FUNCTION trg_purchases_tier_raised() SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION trg_payments_refunded() SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION trg_trainers_retry_pending() SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION trg_availability_retry_pending() SECURITY DEFINER
    SET search_path = public, pg_temp;
ALTER FUNCTION trg_allocations_retry_pending() SECURITY DEFINER
    SET search_path = public, pg_temp;
ALTER FUNCTION trg_sessions_retry_pending() SECURITY DEFINER SET search_path = public, pg_temp;

-- Every SECURITY DEFINER function: closed to PUBLIC, then granted to who needs it.
DO $$
DECLARE
    v_fn regprocedure;
BEGIN
    FOR v_fn IN
        SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.prosecdef
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_fn);
    END LOOP;
END
$$;

-- The worker enqueues (sessions after an upgrade, the sweep, the healer); nobody else does.
GRANT EXECUTE ON FUNCTION enqueue_stage(text, uuid, text, interval) TO kc_worker;
-- The operator's actions.
GRANT EXECUTE ON FUNCTION replay_stage(text, uuid), replay_failed(text),
    assign_trainer(uuid, uuid, boolean, text), stuck_rows(interval) TO kc_operator;
-- apply_refund and retry_pending_allocations: only through their triggers (no grant).
