-- 0013 console: an operator's action says who did it.
-- The operations console (workers/console/) acts for a person who signed in with its token,
-- through the operator functions, as kc_operator: the database login is the console's, so the
-- person's name must travel as an argument. replay_stage, replay_failed, assign_trainer and
-- reschedule take an optional actor ('console:<name>'); without one the actor is the database
-- login (session_user), so a replay typed in psql names its author too.
--
-- stage_history.actor: who asked for an event; NULL for what the pipeline did by itself.
-- The rows an operator function writes are many and written deep inside it (enqueue_stage's
-- 'replayed' or 'enqueued', reschedule's 'rescheduled'), so the function names its actor in
-- the transaction-local setting kc.actor, which the column's default reads, and puts the
-- previous value back before it returns: the actor covers what the function did, nothing
-- after it. The functions' bodies are unchanged: each is renamed kc_<name> (no grant, not
-- SECURITY DEFINER: only the new functions, which run as the owner, call them) and the public
-- name is a thin SECURITY DEFINER function that names the actor and calls it.

ALTER TABLE stage_history ADD COLUMN actor text
    DEFAULT nullif(current_setting('kc.actor', true), '');

-- assign_requested: an admin asked for a trainer (ref: purchase; detail: the request).
ALTER TABLE stage_history
    DROP CONSTRAINT stage_history_event_check,
    ADD CONSTRAINT stage_history_event_check CHECK (event IN (
        'enqueued', 'succeeded', 'skipped', 'rejected', 'failed', 'replayed', 'healed',
        'refunded', 'completed', 'trainer_changed', 'rescheduled', 'makeup',
        'assign_requested'));

-- Names the actor for the rest of the calling function; returns the value to put back.
CREATE FUNCTION kc_act_as(p_actor text) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v_previous text := coalesce(current_setting('kc.actor', true), '');
BEGIN
    IF p_actor IS NOT NULL
       AND (btrim(p_actor) = '' OR length(p_actor) > 100 OR p_actor ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION 'an actor is 1 to 100 printable characters (or NULL: the database login)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('kc.actor', coalesce(btrim(p_actor), session_user), true);
    RETURN v_previous;
END
$$;

ALTER FUNCTION replay_stage(text, uuid) RENAME TO kc_replay_stage;
ALTER FUNCTION assign_trainer(uuid, uuid, boolean, text) RENAME TO kc_assign_trainer;
ALTER FUNCTION reschedule(uuid, text, date, text) RENAME TO kc_reschedule;
ALTER FUNCTION kc_replay_stage(text, uuid) SECURITY INVOKER;
ALTER FUNCTION kc_assign_trainer(uuid, uuid, boolean, text) SECURITY INVOKER;
ALTER FUNCTION kc_reschedule(uuid, text, date, text) SECURITY INVOKER;
REVOKE EXECUTE ON FUNCTION kc_replay_stage(text, uuid),
    kc_assign_trainer(uuid, uuid, boolean, text), kc_reschedule(uuid, text, date, text)
    FROM PUBLIC, kc_operator;
REVOKE EXECUTE ON FUNCTION kc_act_as(text) FROM PUBLIC;
DROP FUNCTION replay_failed(text);

CREATE FUNCTION replay_stage(p_stage text, p_ref uuid, p_actor text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_previous text := kc_act_as(p_actor);
    v_job      bigint := kc_replay_stage(p_stage, p_ref);
BEGIN
    PERFORM set_config('kc.actor', v_previous, true);
    RETURN v_job;
END
$$;

CREATE FUNCTION replay_failed(p_stage text, p_actor text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_previous text := kc_act_as(p_actor);
    v_replayed integer;
BEGIN
    SELECT count(kc_replay_stage(stage, ref_id))::integer INTO v_replayed
    FROM (SELECT stage, ref_id FROM stage_jobs WHERE stage = p_stage AND status = 'failed') f;
    PERFORM set_config('kc.actor', v_previous, true);
    RETURN v_replayed;
END
$$;

CREATE FUNCTION assign_trainer(p_purchase uuid, p_trainer uuid, p_override boolean DEFAULT false,
                               p_note text DEFAULT NULL, p_actor text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_previous text := kc_act_as(p_actor);
    v_request  bigint := kc_assign_trainer(p_purchase, p_trainer, p_override, p_note);
BEGIN
    UPDATE allocation_requests SET requested_by = current_setting('kc.actor')
    WHERE id = v_request;
    INSERT INTO stage_history (stage, ref_id, event, detail)
    SELECT 'allocation', p_purchase, 'assign_requested',
           format('request %s: trainer %s (%s)%s', v_request, t.id, t.full_name,
                  CASE WHEN p_override THEN ', override: ' || p_note ELSE '' END)
    FROM trainers t WHERE t.id = p_trainer;
    PERFORM set_config('kc.actor', v_previous, true);
    RETURN v_request;
END
$$;

CREATE FUNCTION reschedule(p_purchase uuid, p_time_slot text DEFAULT NULL,
                           p_start_date date DEFAULT NULL, p_schedule_mode text DEFAULT NULL,
                           p_actor text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_previous text := kc_act_as(p_actor);
    v_request  bigint := kc_reschedule(p_purchase, p_time_slot, p_start_date, p_schedule_mode);
BEGIN
    UPDATE schedule_changes SET requested_by = current_setting('kc.actor') WHERE id = v_request;
    PERFORM set_config('kc.actor', v_previous, true);
    RETURN v_request;
END
$$;

REVOKE EXECUTE ON FUNCTION replay_stage(text, uuid, text), replay_failed(text, text),
    assign_trainer(uuid, uuid, boolean, text, text), reschedule(uuid, text, date, text, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replay_stage(text, uuid, text), replay_failed(text, text),
    assign_trainer(uuid, uuid, boolean, text, text), reschedule(uuid, text, date, text, text)
    TO kc_operator;
