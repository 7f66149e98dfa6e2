-- 0015 access (issue 21): who may connect to the pipeline's database, what a worker may
-- change in the audit trail and the sequences, how far ahead a reschedule may go.

-------------------------------------------------------------------------------------------------
-- Connecting. PUBLIC keeps CONNECT and TEMPORARY on a new database: any login of the cluster
-- could connect and take the migration's advisory lock, a trainer's lock, or NOTIFY the
-- workers. Only the project's roles (and their members) may connect, and the roles already
-- granted a right on a table, view or function of the schema (the payment service's login,
-- say), so that closing the door locks out nobody who was let in; nobody needs temporary
-- tables. A database's privileges are not copied by CREATE DATABASE ... TEMPLATE nor by a
-- plain pg_dump, so the statements are a function: the migration calls it, and so does whoever
-- copies or restores the database (the tests, for their copies; `make doctor` says when).
-- It runs as its caller (the database's owner or a superuser: only they may change a
-- database's privileges), so nobody else is granted it.
-------------------------------------------------------------------------------------------------
CREATE FUNCTION kc_limit_database_access() RETURNS void
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_database text := current_database();
    v_owner    regrole := (SELECT datdba::regrole FROM pg_database WHERE datname = v_database);
    v_grantee  regrole;
BEGIN
    IF NOT has_database_privilege('public', v_database, 'CONNECT')
       AND NOT has_database_privilege('public', v_database, 'TEMPORARY')
       AND has_database_privilege('kc_owner', v_database, 'CONNECT')
       AND has_database_privilege('kc_worker', v_database, 'CONNECT')
       AND has_database_privilege('kc_operator', v_database, 'CONNECT') THEN
        RETURN;  -- done before (by its owner, or an earlier run)
    END IF;
    IF NOT pg_has_role(current_user, v_owner, 'MEMBER')
       AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'only the owner of database % (%) or a superuser may say who connects '
                        'to it, and % is neither', v_database, v_owner, current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('as %s: REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC; '
                                'GRANT CONNECT ON DATABASE %I TO kc_owner, kc_worker, '
                                'kc_operator; then migrate again', v_owner, v_database,
                                v_database);
    END IF;
    FOR v_grantee IN
        SELECT DISTINCT acl.grantee::regrole
        FROM (SELECT c.relacl AS acl FROM pg_class c
              WHERE c.relnamespace = 'public'::regnamespace
              UNION ALL
              SELECT p.proacl FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace) o,
             aclexplode(o.acl) acl
        WHERE acl.grantee <> 0  -- PUBLIC
          AND acl.grantee NOT IN ('kc_owner'::regrole, 'kc_worker'::regrole,
                                  'kc_operator'::regrole)
    LOOP
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %s', v_database, v_grantee);
    END LOOP;
    EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', v_database);
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO kc_owner, kc_worker, kc_operator',
                   v_database);
END
$$;
REVOKE EXECUTE ON FUNCTION kc_limit_database_access() FROM PUBLIC;

-- As the login that runs the migration (kc_owner owns the schema, not the database), then
-- back to the migration's role; both changes are LOCAL to this migration's transaction.
SELECT set_config('kc.migration_role', current_user, true);
SET LOCAL ROLE NONE;
SELECT kc_limit_database_access();
DO $$
BEGIN
    EXECUTE format('SET LOCAL ROLE %I', current_setting('kc.migration_role'));
END
$$;

-------------------------------------------------------------------------------------------------
-- The audit trail: a worker adds history, it never changes or removes it. Pruning old rows
-- (the daily prune_history job) runs as the owner and keeps at least a day.
-------------------------------------------------------------------------------------------------
REVOKE UPDATE, DELETE, TRUNCATE ON stage_history FROM kc_worker, kc_operator;

CREATE OR REPLACE FUNCTION prune_history(p_keep interval)
RETURNS TABLE (history_deleted bigint, log_deleted bigint, starts_deleted bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    IF p_keep IS NULL OR p_keep < interval '1 day' THEN
        RAISE EXCEPTION 'history is kept for at least a day, not %',
            coalesce(p_keep::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
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
    SELECT (SELECT count(*) FROM h), (SELECT count(*) FROM l), (SELECT count(*) FROM s);
END
$$;
REVOKE EXECUTE ON FUNCTION prune_history(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION prune_history(interval) TO kc_worker;

-------------------------------------------------------------------------------------------------
-- Sequences: nextval needs USAGE, setval needs UPDATE. No role but the owner sets one
-- (setval('stage_history_id_seq', 1) made every later enqueue fail, and with it the payment
-- service's INSERT). pgqueuer 1.6 only draws from its sequences.
-------------------------------------------------------------------------------------------------
REVOKE UPDATE ON ALL SEQUENCES IN SCHEMA public FROM kc_worker, kc_operator;
ALTER DEFAULT PRIVILEGES FOR ROLE kc_owner IN SCHEMA public
    REVOKE UPDATE ON SEQUENCES FROM kc_worker;

-------------------------------------------------------------------------------------------------
-- reschedule: a start date at most a year ahead, as a payment's metadata. Unbounded, December
-- 9999 cancelled a course's sessions and rewrote them for that month, and 9999-12-31 left the
-- request open and its job held failed.
-------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION kc_reschedule(p_purchase uuid, p_time_slot text DEFAULT NULL,
                                         p_start_date date DEFAULT NULL,
                                         p_schedule_mode text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v_purchase student_course_purchases%ROWTYPE;
    v_today    date;
    v_slot     time;
    v_start    date;
    v_mode     text;
    v_started  integer;
    v_request  bigint;
BEGIN
    SELECT * INTO v_purchase FROM student_course_purchases WHERE id = p_purchase FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no purchase %', p_purchase USING ERRCODE = 'no_data_found';
    ELSIF v_purchase.completed_at IS NOT NULL THEN
        RAISE EXCEPTION 'purchase % is finished (completed at %); a new payment starts the '
                        'course again', p_purchase, v_purchase.completed_at
            USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSIF NOT v_purchase.is_active THEN
        RAISE EXCEPTION 'purchase % is not active (refunded at %)', p_purchase,
            v_purchase.deactivated_at USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF p_time_slot IS NULL AND p_start_date IS NULL AND p_schedule_mode IS NULL THEN
        RAISE EXCEPTION 'nothing to change: give a time slot, a start date or a schedule mode '
                        '(NULL keeps one)' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    v_slot := coalesce(kc_parse_clock(p_time_slot), v_purchase.preferred_time_slot);
    v_mode := coalesce(replace(replace(lower(btrim(p_schedule_mode)), '-', '_'), ' ', '_'),
                       v_purchase.schedule_mode);
    IF v_mode NOT IN ('daily', 'weekdays', 'sunday_only') THEN
        RAISE EXCEPTION 'schedule mode % is not one of daily, weekdays, sunday_only',
            quote_literal(left(p_schedule_mode, 80)) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT (now() AT TIME ZONE s.timezone)::date INTO v_today
    FROM students s WHERE s.id = v_purchase.student_id;
    IF p_start_date < v_today THEN
        RAISE EXCEPTION 'start date % is in the past (today is % in the student''s time zone)',
            p_start_date, v_today USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The bound a payment's startDate has (workers/rules/metadata.py, latest_start): a year
    -- ahead, 28 February for 29 February; same sentence.
    IF p_start_date > (v_today + interval '1 year')::date THEN
        RAISE EXCEPTION 'start date % is more than a year ahead; the latest start accepted '
                        'today is %', p_start_date, (v_today + interval '1 year')::date
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_start := coalesce(p_start_date, v_purchase.start_date);
    IF extract(epoch FROM v_slot) + 60 * v_purchase.session_duration_minutes > 86400 THEN
        RAISE EXCEPTION 'a %-minute session at % would end after midnight',
            v_purchase.session_duration_minutes, to_char(v_slot, 'HH24:MI')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (v_slot, v_start, v_mode) = (v_purchase.preferred_time_slot, v_purchase.start_date,
                                    v_purchase.schedule_mode) THEN
        RAISE EXCEPTION 'nothing changes: purchase % already runs % at % from %', p_purchase,
            v_mode, to_char(v_slot, 'HH24:MI'), v_start
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT count(*) INTO v_started
    FROM tutoring_sessions ts JOIN trainer_allocations ta ON ta.id = ts.allocation_id
    WHERE ta.purchase_id = p_purchase AND ts.status <> 'cancelled' AND ts.starts_at <= now();
    IF v_started >= v_purchase.purchase_tier THEN
        RAISE EXCEPTION 'every session of purchase % has started: nothing is left to reschedule',
            p_purchase USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    UPDATE student_course_purchases
    SET preferred_time_slot = v_slot, start_date = v_start, schedule_mode = v_mode
    WHERE id = p_purchase;
    INSERT INTO schedule_changes (purchase_id, from_time_slot, to_time_slot, from_start_date,
                                  to_start_date, from_schedule_mode, to_schedule_mode)
    VALUES (p_purchase, v_purchase.preferred_time_slot, v_slot, v_purchase.start_date, v_start,
            v_purchase.schedule_mode, v_mode)
    RETURNING id INTO v_request;
    PERFORM kc_enqueue_allocation(p_purchase, 'rescheduled', format(
        'request %s: %s at %s from %s -> %s at %s from %s', v_request,
        v_purchase.schedule_mode, to_char(v_purchase.preferred_time_slot, 'HH24:MI'),
        v_purchase.start_date, v_mode, to_char(v_slot, 'HH24:MI'), v_start));
    RETURN v_request;
END
$$;
