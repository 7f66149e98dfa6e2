-- 0014 console operators: one token per person, sessions kept by the database, and the actor
-- of an event decided by the database.
--
-- Before: the console had one shared token (KC_CONSOLE_TOKEN), a person typed their own name,
-- and the operator functions took that name as an argument and put it in the setting kc.actor,
-- which stage_history.actor's default read. Any session may set kc.actor (or name the column
-- in its INSERT), so a worker could write any name into the audit trail.
--
-- Now:
-- * console_operators: one row per person. `python -m workers operator add <name>` makes a
--   random token of 256 bits, prints it once, and stores only its SHA-256. A fast hash is
--   enough: a slow one (bcrypt, scrypt) makes guessing a low-entropy password from a stolen
--   hash expensive, and nobody guesses 256 random bits, fast hash or not; it also lets the
--   token be found by an index (UNIQUE token_hash) instead of comparing it with every
--   operator's. Revoking an operator ends every session they have, at once.
-- * console_sessions: a signed-in browser. Its cookie carries only a random id; the database
--   keeps the id's SHA-256 (a copy of the table signs nobody in), the operator, and an absolute
--   expiry 12 hours after sign-in (using the session does not extend it).
-- * The operator functions take the console's session id instead of a name and record the
--   operator it belongs to (`console:<name>`), after checking that the session is live;
--   without a session the actor is the database login (session_user), which no session can
--   change. They name the actor in kc_acting, a table nobody but the owner may write, keyed
--   by the backend and written and deleted inside the function's own transaction, so no other
--   transaction ever sees a row of it. stage_history.actor has no default any more: a trigger
--   sets it from kc_acting on every insert that claims an actor, whatever the insert said.
--   requested_by of an admin request may change only to the actor kc_acting names.
--
-- Who may call what: console_sign_in, console_session, console_sign_out and
-- console_operator_count are for kc_operator (the console); console_operator_add and
-- console_operator_revoke are the owner's only (no grant: `python -m workers operator` runs
-- with the owner's login); kc_operator may not read the operator and session tables at all.

CREATE TABLE console_operators (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL,
    token_hash      bytea NOT NULL UNIQUE,
    token_issued_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL DEFAULT session_user,
    revoked_at      timestamptz,
    revoked_by      text,
    CONSTRAINT console_operators_name_check CHECK (
        name = btrim(name) AND length(name) BETWEEN 1 AND 60 AND name !~ '[[:cntrl:]]'),
    CONSTRAINT console_operators_token_hash_check CHECK (length(token_hash) = 32)
);
-- A name is one person for ever, so that `console:<name>` in the history is unambiguous.
CREATE UNIQUE INDEX console_operators_name_key ON console_operators (lower(name));

CREATE TABLE console_sessions (
    id_hash      bytea PRIMARY KEY,
    operator_id  bigint NOT NULL REFERENCES console_operators (id),
    signed_in_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    ended_at     timestamptz,
    client       text,
    CONSTRAINT console_sessions_id_hash_check CHECK (length(id_hash) = 32),
    CONSTRAINT console_sessions_client_check CHECK (length(client) <= 100)
);
CREATE INDEX console_sessions_operator_idx ON console_sessions (operator_id)
    WHERE ended_at IS NULL;

-- Who the operator function running in a backend acts for; a row lives only inside that
-- function's transaction.
CREATE TABLE kc_acting (
    pid              integer PRIMARY KEY,
    actor            text NOT NULL,
    previous_setting text  -- kc.acting before the function set it
);

-- kc_operator reads every table by default (0005); not these.
REVOKE ALL ON console_operators, console_sessions, kc_acting FROM kc_operator;

-- -- the owner's: operators -------------------------------------------------------------------

-- Adds an operator, or gives a revoked one a new token (a name stays one person's). The token
-- is made by the caller (workers.ops.commands: secrets.token_urlsafe(32)); it must look like
-- one, so a short or guessable token cannot be stored even by hand.
CREATE FUNCTION console_operator_add(p_name text, p_token text)
RETURNS TABLE (operator text, reinstated boolean)
LANGUAGE plpgsql
AS $$
DECLARE
    v_name     text := btrim(p_name);
    v_existing console_operators;
BEGIN
    IF v_name IS NULL OR v_name = '' OR length(v_name) > 60 OR v_name ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'an operator''s name is 1 to 60 printable characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_token IS NULL OR p_token !~ '^[A-Za-z0-9_-]{43,200}$' THEN
        RAISE EXCEPTION 'an operator''s token is 43 to 200 URL-safe characters (256 random bits '
                        'or more, as secrets.token_urlsafe(32) makes)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_existing FROM console_operators o WHERE lower(o.name) = lower(v_name)
    FOR UPDATE;
    IF FOUND AND v_existing.revoked_at IS NULL THEN
        RAISE EXCEPTION 'operator % already has a token', v_existing.name
            USING ERRCODE = 'unique_violation',
                  HINT = format('to give %s a new one: revoke it first, then add %s again',
                                v_existing.name, v_existing.name);
    END IF;
    IF FOUND THEN
        UPDATE console_operators
        SET token_hash = sha256(convert_to(p_token, 'UTF8')), token_issued_at = now(),
            revoked_at = NULL, revoked_by = NULL
        WHERE id = v_existing.id;
        RETURN QUERY SELECT v_existing.name, true;
        RETURN;
    END IF;
    INSERT INTO console_operators (name, token_hash)
    VALUES (v_name, sha256(convert_to(p_token, 'UTF8')));
    RETURN QUERY SELECT v_name, false;
END
$$;

-- Revokes an operator: their token stops working and every session of theirs ends now.
-- Returns the number of sessions ended.
CREATE FUNCTION console_operator_revoke(p_name text) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_operator console_operators;
    v_ended    integer;
BEGIN
    SELECT * INTO v_operator FROM console_operators o WHERE lower(o.name) = lower(btrim(p_name))
    FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no console operator is named %', p_name
            USING ERRCODE = 'no_data_found';
    END IF;
    IF v_operator.revoked_at IS NOT NULL THEN
        RAISE EXCEPTION 'operator % was already revoked at %', v_operator.name,
            v_operator.revoked_at
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE console_operators SET revoked_at = now(), revoked_by = session_user
    WHERE id = v_operator.id;
    UPDATE console_sessions SET ended_at = now()
    WHERE operator_id = v_operator.id AND ended_at IS NULL;
    GET DIAGNOSTICS v_ended = ROW_COUNT;
    RETURN v_ended;
END
$$;

REVOKE EXECUTE ON FUNCTION console_operator_add(text, text), console_operator_revoke(text)
    FROM PUBLIC;

-- -- the console's: sessions ------------------------------------------------------------------

-- The operator a live session belongs to (no row: unknown, signed out, expired, or revoked).
CREATE FUNCTION kc_console_operator(p_session text)
RETURNS TABLE (operator text, expires_at timestamptz)
LANGUAGE sql
STABLE
AS $$
    SELECT o.name, s.expires_at
    FROM console_sessions s
    JOIN console_operators o ON o.id = s.operator_id
    WHERE s.id_hash = sha256(convert_to(p_session, 'UTF8'))
      AND length(p_session) <= 200
      AND s.ended_at IS NULL AND s.expires_at > now() AND o.revoked_at IS NULL
$$;
REVOKE EXECUTE ON FUNCTION kc_console_operator(text) FROM PUBLIC;

-- Signs in with an operator's token: a new session whose id the console made (and keeps in
-- the browser's cookie). No row: the token is no live operator's.
CREATE FUNCTION console_sign_in(p_token text, p_session text, p_client text DEFAULT NULL)
RETURNS TABLE (operator text, expires_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_operator console_operators;
    v_expires  timestamptz := now() + interval '12 hours';
BEGIN
    IF p_session IS NULL OR p_session !~ '^[A-Za-z0-9_-]{43,200}$' THEN
        RAISE EXCEPTION 'a console session id is 43 to 200 URL-safe characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_token IS NULL OR length(p_token) > 200 THEN
        RETURN;
    END IF;
    SELECT * INTO v_operator FROM console_operators o
    WHERE o.token_hash = sha256(convert_to(p_token, 'UTF8')) AND o.revoked_at IS NULL;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Sessions are kept a month after they end, for the record.
    DELETE FROM console_sessions s
    WHERE coalesce(s.ended_at, s.expires_at) < now() - interval '30 days';
    INSERT INTO console_sessions (id_hash, operator_id, expires_at, client)
    VALUES (sha256(convert_to(p_session, 'UTF8')), v_operator.id, v_expires,
            left(p_client, 100));
    RETURN QUERY SELECT v_operator.name, v_expires;
END
$$;

CREATE FUNCTION console_session(p_session text)
RETURNS TABLE (operator text, expires_at timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$ SELECT * FROM kc_console_operator(p_session) $$;

-- Ends a session (sign-out); false when it was not live.
CREATE FUNCTION console_sign_out(p_session text) RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    WITH ended AS (
        UPDATE console_sessions SET ended_at = now()
        WHERE id_hash = sha256(convert_to(p_session, 'UTF8')) AND length(p_session) <= 200
          AND ended_at IS NULL
        RETURNING 1
    )
    SELECT count(*) > 0 FROM ended
$$;

-- How many operators may sign in (the console refuses to listen beyond loopback with none).
CREATE FUNCTION console_operator_count() RETURNS integer
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$ SELECT count(*)::integer FROM console_operators WHERE revoked_at IS NULL $$;

REVOKE EXECUTE ON FUNCTION console_sign_in(text, text, text), console_session(text),
    console_sign_out(text), console_operator_count() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION console_sign_in(text, text, text), console_session(text),
    console_sign_out(text), console_operator_count() TO kc_operator;

-- -- the actor --------------------------------------------------------------------------------

-- Who an operator function acts for: the console session's operator, checked; without a
-- session the database login.
CREATE FUNCTION kc_operator_actor(p_session text) RETURNS text
LANGUAGE plpgsql
STABLE
AS $$
DECLARE
    v_name text;
BEGIN
    IF p_session IS NULL THEN
        RETURN session_user;
    END IF;
    SELECT c.operator INTO v_name FROM kc_console_operator(p_session) c;
    IF v_name IS NULL THEN
        RAISE EXCEPTION 'this console session is not signed in: it was signed out, it expired '
                        '(12 hours after sign-in), or its operator was revoked'
            USING ERRCODE = 'insufficient_privilege', HINT = 'sign in again';
    END IF;
    RETURN 'console:' || v_name;
END
$$;

-- kc.acting = 'on' while the operator function runs, then back to what it was.
CREATE FUNCTION kc_begin_acting(p_actor text) RETURNS text
LANGUAGE sql
AS $$
    INSERT INTO kc_acting (pid, actor, previous_setting)
    VALUES (pg_backend_pid(), p_actor, current_setting('kc.acting', true));
    SELECT set_config('kc.acting', 'on', true);
    SELECT p_actor;
$$;

CREATE FUNCTION kc_end_acting() RETURNS void
LANGUAGE sql
AS $$
    WITH ended AS (DELETE FROM kc_acting WHERE pid = pg_backend_pid() RETURNING previous_setting)
    SELECT set_config('kc.acting', coalesce((SELECT previous_setting FROM ended), ''), true);
$$;

REVOKE EXECUTE ON FUNCTION kc_operator_actor(text), kc_begin_acting(text), kc_end_acting()
    FROM PUBLIC;

-- stage_history.actor: what kc_acting says for this backend, whatever the insert said. The
-- trigger runs only for an insert that claims an actor or comes from inside an operator
-- function (kc_begin_acting sets kc.acting = 'on'), so the pipeline's own inserts cost
-- nothing more; the setting only decides whether the check runs, never what it finds.
ALTER TABLE stage_history ALTER COLUMN actor DROP DEFAULT;

CREATE FUNCTION trg_stage_history_actor() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    NEW.actor := (SELECT a.actor FROM kc_acting a WHERE a.pid = pg_backend_pid());
    RETURN NEW;
END
$$;
CREATE TRIGGER stage_history_actor BEFORE INSERT ON stage_history
    FOR EACH ROW WHEN (NEW.actor IS NOT NULL OR current_setting('kc.acting', true) = 'on')
    EXECUTE FUNCTION trg_stage_history_actor();

-- requested_by of an admin request: set by the operator function that records it, never by
-- a writer of the table (the worker may update a request's status and outcome).
CREATE FUNCTION trg_requested_by_guard() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM kc_acting a
                   WHERE a.pid = pg_backend_pid() AND a.actor = NEW.requested_by) THEN
        RAISE EXCEPTION '%.requested_by is decided by the database: the operator function '
                        'that records a request names who asked', TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER allocation_requests_requested_by BEFORE UPDATE OF requested_by
    ON allocation_requests
    FOR EACH ROW WHEN (NEW.requested_by IS DISTINCT FROM OLD.requested_by)
    EXECUTE FUNCTION trg_requested_by_guard();
CREATE TRIGGER schedule_changes_requested_by BEFORE UPDATE OF requested_by
    ON schedule_changes
    FOR EACH ROW WHEN (NEW.requested_by IS DISTINCT FROM OLD.requested_by)
    EXECUTE FUNCTION trg_requested_by_guard();

REVOKE EXECUTE ON FUNCTION trg_stage_history_actor(), trg_requested_by_guard() FROM PUBLIC;

-- -- the operator functions, with a session instead of a name ---------------------------------

DROP FUNCTION replay_stage(text, uuid, text), replay_failed(text, text),
    assign_trainer(uuid, uuid, boolean, text, text), reschedule(uuid, text, date, text, text);
DROP FUNCTION kc_act_as(text);

CREATE FUNCTION replay_stage(p_stage text, p_ref uuid, p_session text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor text   := kc_begin_acting(kc_operator_actor(p_session));
    v_job   bigint := kc_replay_stage(p_stage, p_ref);
BEGIN
    PERFORM kc_end_acting();
    RETURN v_job;
END
$$;

CREATE FUNCTION replay_failed(p_stage text, p_session text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor    text := kc_begin_acting(kc_operator_actor(p_session));
    v_replayed integer;
BEGIN
    SELECT count(kc_replay_stage(stage, ref_id))::integer INTO v_replayed
    FROM (SELECT stage, ref_id FROM stage_jobs WHERE stage = p_stage AND status = 'failed') f;
    PERFORM kc_end_acting();
    RETURN v_replayed;
END
$$;

CREATE FUNCTION assign_trainer(p_purchase uuid, p_trainer uuid, p_override boolean DEFAULT false,
                               p_note text DEFAULT NULL, p_session text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor   text   := kc_begin_acting(kc_operator_actor(p_session));
    v_request bigint := kc_assign_trainer(p_purchase, p_trainer, p_override, p_note);
BEGIN
    UPDATE allocation_requests SET requested_by = v_actor WHERE id = v_request;
    INSERT INTO stage_history (stage, ref_id, event, detail)
    SELECT 'allocation', p_purchase, 'assign_requested',
           format('request %s: trainer %s (%s)%s', v_request, t.id, t.full_name,
                  CASE WHEN p_override THEN ', override: ' || p_note ELSE '' END)
    FROM trainers t WHERE t.id = p_trainer;
    PERFORM kc_end_acting();
    RETURN v_request;
END
$$;

CREATE FUNCTION reschedule(p_purchase uuid, p_time_slot text DEFAULT NULL,
                           p_start_date date DEFAULT NULL, p_schedule_mode text DEFAULT NULL,
                           p_session text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor   text   := kc_begin_acting(kc_operator_actor(p_session));
    v_request bigint := kc_reschedule(p_purchase, p_time_slot, p_start_date, p_schedule_mode);
BEGIN
    UPDATE schedule_changes SET requested_by = v_actor WHERE id = v_request;
    PERFORM kc_end_acting();
    RETURN v_request;
END
$$;

REVOKE EXECUTE ON FUNCTION replay_stage(text, uuid, text), replay_failed(text, text),
    assign_trainer(uuid, uuid, boolean, text, text), reschedule(uuid, text, date, text, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replay_stage(text, uuid, text), replay_failed(text, text),
    assign_trainer(uuid, uuid, boolean, text, text), reschedule(uuid, text, date, text, text)
    TO kc_operator;
