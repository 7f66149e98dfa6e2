-- 0005 roles: least privilege.
--   kc_owner     owns every object and runs the migrations (alembic SETs this role).
--   kc_worker    what the stages need: read the inputs, write the outputs and the queue.
--   kc_operator  reads everything, runs replays and admin assignment (SECURITY DEFINER
--                functions); cannot change a table directly or run DDL.
-- Login roles are granted one of these, e.g. CREATE ROLE pipeline LOGIN IN ROLE kc_worker.
-- Roles belong to the cluster, so they are created only when missing.

DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['kc_owner', 'kc_worker', 'kc_operator'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            IF NOT (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user)
            THEN
                RAISE EXCEPTION 'role % does not exist and % may not create roles', v_role,
                    current_user
                    USING HINT = 'as a superuser: CREATE ROLE kc_owner NOLOGIN; CREATE ROLE '
                                 'kc_worker NOLOGIN; CREATE ROLE kc_operator NOLOGIN; '
                                 'GRANT kc_owner TO <migrating user>;';
            END IF;
            EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
        END IF;
    END LOOP;
    IF NOT pg_has_role(current_user, 'kc_owner', 'MEMBER') THEN
        EXECUTE format('GRANT kc_owner TO %I', current_user);
    END IF;
END
$$;

GRANT USAGE, CREATE ON SCHEMA public TO kc_owner;
GRANT USAGE ON SCHEMA public TO kc_worker, kc_operator;

-- Every object of the schema belongs to kc_owner (SECURITY DEFINER functions run as it).
DO $$
DECLARE
    v_object record;
BEGIN
    FOR v_object IN
        SELECT c.relname, c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        -- a table's sequences follow the table
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'm', 'p')
    LOOP
        EXECUTE format('ALTER %s public.%I OWNER TO kc_owner',
                       CASE v_object.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN
                       'MATERIALIZED VIEW' ELSE 'TABLE' END,
                       v_object.relname);
    END LOOP;
    FOR v_object IN
        SELECT p.oid::regprocedure AS signature FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO kc_owner', v_object.signature);
    END LOOP;
    FOR v_object IN
        SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' AND t.typtype = 'e'
    LOOP
        EXECUTE format('ALTER TYPE public.%I OWNER TO kc_owner', v_object.typname);
    END LOOP;
END
$$;

-- Serialise approvals per trainer without a row lock (which would need UPDATE on trainers):
-- the allocation stage and the capacity trigger take the same transaction-scoped lock.
CREATE FUNCTION kc_lock_trainer(p_trainer uuid) RETURNS void
LANGUAGE sql
AS $$ SELECT pg_advisory_xact_lock(hashtextextended('kc-trainer:' || p_trainer::text, 0)) $$;
ALTER FUNCTION kc_lock_trainer(uuid) OWNER TO kc_owner;

CREATE OR REPLACE FUNCTION trg_allocations_check_capacity() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_rating numeric;
    v_live   integer;
BEGIN
    IF NEW.status <> 'approved' OR NEW.trainer_id IS NULL OR NEW.capacity_override THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = 'approved'
       AND OLD.trainer_id IS NOT DISTINCT FROM NEW.trainer_id THEN
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

-- Triggers run with the rights of whoever writes the row (the payment service, the app, an
-- admin, the worker): what they call to enqueue, refund and retry runs with the owner's.
ALTER FUNCTION enqueue_stage(text, uuid, text, interval) SECURITY DEFINER;
ALTER FUNCTION enqueue_stage(text, uuid, text, interval) SET search_path = public, pg_temp;
ALTER FUNCTION apply_refund(uuid) SECURITY DEFINER;
ALTER FUNCTION apply_refund(uuid) SET search_path = public, pg_temp;
ALTER FUNCTION retry_pending_allocations(uuid) SECURITY DEFINER;
ALTER FUNCTION retry_pending_allocations(uuid) SET search_path = public, pg_temp;

-- Admin assignment is an operator's action: it runs with the owner's rights.
ALTER FUNCTION assign_trainer(uuid, uuid, boolean, text) SECURITY DEFINER;
ALTER FUNCTION assign_trainer(uuid, uuid, boolean, text) SET search_path = public, pg_temp;
ALTER FUNCTION stuck_rows(interval) SECURITY DEFINER;
ALTER FUNCTION stuck_rows(interval) SET search_path = public, pg_temp;

-- Functions that act with the owner's rights are not for everyone.
REVOKE EXECUTE ON FUNCTION replay_stage(text, uuid), replay_failed(text),
    assign_trainer(uuid, uuid, boolean, text), stuck_rows(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replay_stage(text, uuid), replay_failed(text),
    assign_trainer(uuid, uuid, boolean, text), stuck_rows(interval) TO kc_operator;

-- The worker.
GRANT SELECT ON courses, students, trainers, trainer_availability, holidays, payments
    TO kc_worker;
GRANT UPDATE (updated_at) ON payments TO kc_worker;  -- FOR UPDATE needs an UPDATE right
GRANT SELECT, INSERT, UPDATE ON student_course_purchases, trainer_allocations,
    tutoring_sessions, payment_rejections, purchase_upgrades TO kc_worker;
GRANT SELECT, UPDATE ON allocation_requests TO kc_worker;
GRANT SELECT, INSERT, DELETE ON stage_history TO kc_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON job_starts, pgqueuer, pgqueuer_log,
    pgqueuer_statistics, pgqueuer_schedules TO kc_worker;
GRANT SELECT ON live_jobs, stage_jobs, stage_last_event, stage_last_error, stage_overview,
    failed_jobs, purchase_trace, rejected_payments, healed_rows, stuck TO kc_worker;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO kc_worker;

-- The operator: reads everything, changes nothing directly.
GRANT SELECT ON ALL TABLES IN SCHEMA public TO kc_operator;

ALTER DEFAULT PRIVILEGES FOR ROLE kc_owner IN SCHEMA public
    GRANT SELECT ON TABLES TO kc_operator;
ALTER DEFAULT PRIVILEGES FOR ROLE kc_owner IN SCHEMA public
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO kc_worker;
