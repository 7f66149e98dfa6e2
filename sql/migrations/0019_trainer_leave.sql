-- 0019 a trainer's leave, and substitutes for single sessions (issue 24, part B).
--
-- The app this replaces had no leave: an admin wrote one `trainer_session_substitutions` row
-- per student per day, by hand, with none of the matching rules, and the session's trainer_id
-- never changed (the substitute could not start it, nor see it in their list). Here:
--
-- * trainer_leaves: a trainer's days away (first_day..last_day, the students' local dates),
--   requested (by the app, kc_app, or an operator), approved or cancelled by an operator, with
--   who did each and when. No two leaves of one trainer that are not cancelled overlap (an
--   exclusion constraint, the last line of defence behind request_leave's own check).
-- * Approving a leave gives every scheduled session of that trainer in those days that has
--   not started a substitute: the best other trainer who fits that one session by the
--   matching rules (kc_best_substitute, kc_session_fit of migration 0018, plus "not on leave
--   that day"). The session's trainer_id becomes the substitute, who then sees it in their
--   schedule and whose time it holds (the no-overlap constraint applies to it as to any
--   session); original_trainer_id and substitution_leave_id say whose it was and why. When
--   nobody fits, the session is cancelled (cancel_reason says why) and the make-up follows by
--   the existing rule (trigger tutoring_sessions_makeup).
-- * A substitution does not count against capacity: capacity counts the courses a trainer
--   carries (approved allocations), and the allocation stays the original trainer's; the
--   substitute lends an hour of free time, which the no-overlap constraint protects.
-- * A leave longer than p_handover_days (the CLI and console pass KC_LEAVE_HANDOVER_DAYS,
--   default 14) hands the trainer's courses over as when a trainer leaves: unfit_allocations
--   names them (why = 'on_leave') and the allocation stage moves what is ahead to the best
--   other trainer (workers/stages/lifecycle.py move_away), or the purchase waits visibly.
-- * Cancelling an approved leave gives its future sessions back to their trainer where the
--   trainer is still free then (kc_session_fit, p_full = false, under the trainer's lock);
--   the others stay with their substitute. Cancelled sessions stay cancelled (their make-ups
--   exist). A handed-over course stays with its new trainer.
-- * substitute_session: an operator puts a substitute on one session without leave: a named
--   trainer, checked by every rule (refused with the rule's sentence), or the best.
--
-- Locks (docs/allocation-under-scarcity.md): every substituting function first takes the
-- substitutions' advisory lock (one substituting transaction at a time: only these hold one
-- trainer's lock while waiting for another's), then the purchases' rows in id order (the
-- allocation stage's first lock), then one trainer's lock at a time, taken in a block that is
-- rolled back (releasing it) when that trainer does not fit under it.

CREATE TABLE trainer_leaves (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    trainer_id   uuid NOT NULL REFERENCES trainers (id),
    first_day    date NOT NULL,
    last_day     date NOT NULL,
    reason       text NOT NULL,
    status       text NOT NULL DEFAULT 'requested',
    requested_by text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    approved_by  text,
    approved_at  timestamptz,
    cancelled_by text,
    cancelled_at timestamptz,
    handed_over  boolean NOT NULL DEFAULT false,  -- approved as longer than the hand-over bound
    outcome      text,                            -- what approving or cancelling did
    CONSTRAINT trainer_leaves_days_check CHECK (last_day >= first_day),
    CONSTRAINT trainer_leaves_length_check CHECK (last_day - first_day < 366),
    CONSTRAINT trainer_leaves_reason_check CHECK (btrim(reason) <> '' AND length(reason) <= 500),
    CONSTRAINT trainer_leaves_status_check
        CHECK (status IN ('requested', 'approved', 'cancelled')),
    CONSTRAINT trainer_leaves_approved_check
        CHECK ((approved_at IS NULL) = (approved_by IS NULL)
               AND (status <> 'approved' OR approved_at IS NOT NULL)),
    CONSTRAINT trainer_leaves_cancelled_check
        CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL)
               AND (cancelled_at IS NULL) = (cancelled_by IS NULL)),
    CONSTRAINT trainer_leaves_no_overlap
        EXCLUDE USING gist (trainer_id WITH =, daterange(first_day, last_day, '[]') WITH &&)
        WHERE (status <> 'cancelled')
);
CREATE INDEX trainer_leaves_approved_idx ON trainer_leaves (trainer_id, first_day)
    WHERE status = 'approved';

-- Beside a substituted session: whose it was, and the leave that moved it (NULL: an
-- operator's substitute_session). cancel_reason: why the pipeline cancelled a session.
ALTER TABLE tutoring_sessions
    ADD COLUMN original_trainer_id uuid REFERENCES trainers (id),
    ADD COLUMN substitution_leave_id bigint REFERENCES trainer_leaves (id),
    ADD COLUMN substituted_at timestamptz,
    ADD COLUMN cancel_reason text,
    ADD CONSTRAINT tutoring_sessions_substitute_check
        CHECK (original_trainer_id IS DISTINCT FROM trainer_id
               AND (original_trainer_id IS NULL) = (substituted_at IS NULL)
               AND (substitution_leave_id IS NULL OR original_trainer_id IS NOT NULL
                    OR status = 'cancelled'));
-- Whoever changes a session's trainer (a leave, substitute_session, a move's substitute of
-- migration 0018), the columns beside it follow: the first change records whose it was; back
-- to that trainer clears them. An update that sets them itself is left as it says.
CREATE FUNCTION trg_sessions_substitute_columns() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.trainer_id = NEW.original_trainer_id THEN
        NEW.original_trainer_id := NULL;
        NEW.substitution_leave_id := NULL;
        NEW.substituted_at := NULL;
    ELSIF OLD.original_trainer_id IS NULL AND NEW.original_trainer_id IS NULL THEN
        NEW.original_trainer_id := OLD.trainer_id;
        NEW.substituted_at := now();
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER tutoring_sessions_substitute_columns
    BEFORE UPDATE OF trainer_id ON tutoring_sessions
    FOR EACH ROW WHEN (NEW.trainer_id IS DISTINCT FROM OLD.trainer_id)
    EXECUTE FUNCTION trg_sessions_substitute_columns();

CREATE INDEX tutoring_sessions_leave_idx ON tutoring_sessions (substitution_leave_id)
    WHERE substitution_leave_id IS NOT NULL;

-- The app's old table, by its field names: one row per session a substitute now teaches.
CREATE VIEW trainer_session_substitutions AS
SELECT ts.id AS session_id, ts.scheduled_date AS session_date, ts.scheduled_time AS session_time,
       ts.original_trainer_id, ts.trainer_id AS substitute_trainer_id, ts.student_id,
       ts.allocation_id, ts.substitution_leave_id AS leave_id, ts.substituted_at, ts.status
FROM tutoring_sessions ts
WHERE ts.original_trainer_id IS NOT NULL;

-- History lines (stage 'allocation', ref: the purchase): substituted (a substitute took a
-- session), substitute_ended (it went back to its trainer), leave (a leave cancelled a session
-- nobody could take).
ALTER TABLE stage_history
    DROP CONSTRAINT stage_history_event_check,
    ADD CONSTRAINT stage_history_event_check CHECK (event IN (
        'enqueued', 'succeeded', 'skipped', 'rejected', 'failed', 'replayed', 'healed',
        'refunded', 'completed', 'trainer_changed', 'rescheduled', 'makeup',
        'assign_requested', 'move_requested', 'move_approved', 'move_rejected',
        'move_cancelled', 'substituted', 'substitute_ended', 'leave'));

-------------------------------------------------------------------------------------------------
-- Rules
-------------------------------------------------------------------------------------------------

-- The first date of a leave that is still ahead somewhere: today where the day began last
-- (UTC-12). A leave whose last day is before it has ended everywhere. Anyone may call it
-- (the view unfit_allocations does, as whoever reads it).
CREATE FUNCTION kc_leave_today() RETURNS date
LANGUAGE sql STABLE
AS $$ SELECT (now() AT TIME ZONE 'Etc/GMT+12')::date $$;

-- A trainer on approved leave takes no session on those days: not a substitute's, not a
-- moved one (part A's moves ask kc_session_fit too), not one given back. The rule goes in
-- front of kc_session_fit's (migration 0018), which keeps its body under another name, so
-- kc_best_substitute and every caller apply it.
ALTER FUNCTION kc_session_fit(uuid, uuid, date, time, boolean)
    RENAME TO kc_session_fit_rules;
REVOKE EXECUTE ON FUNCTION kc_session_fit_rules(uuid, uuid, date, time, boolean)
    FROM kc_operator;

CREATE FUNCTION kc_session_fit(p_session_id uuid, p_trainer_id uuid, p_date date,
                               p_start time, p_full boolean)
RETURNS text
LANGUAGE plpgsql
STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
    v_leave trainer_leaves%ROWTYPE;
BEGIN
    SELECT * INTO v_leave FROM trainer_leaves l
    WHERE l.trainer_id = p_trainer_id AND l.status = 'approved'
      AND p_date BETWEEN l.first_day AND l.last_day
    LIMIT 1;
    IF FOUND THEN
        RETURN format('on_leave: trainer %s is on leave from %s to %s (leave %s)',
                      (SELECT full_name FROM trainers WHERE id = p_trainer_id),
                      kc_long_date(v_leave.first_day), kc_long_date(v_leave.last_day),
                      v_leave.id);
    END IF;
    RETURN kc_session_fit_rules(p_session_id, p_trainer_id, p_date, p_start, p_full);
END
$$;
REVOKE EXECUTE ON FUNCTION kc_session_fit(uuid, uuid, date, time, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kc_session_fit(uuid, uuid, date, time, boolean) TO kc_operator;

-- The session's own date and time.
CREATE FUNCTION kc_substitute_fit(p_session_id uuid, p_trainer uuid, p_full boolean)
RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT kc_session_fit(ts.id, p_trainer, ts.scheduled_date, ts.scheduled_time, p_full)
    FROM tutoring_sessions ts WHERE ts.id = p_session_id
$$;

-- The history line of one session's change (ref: its purchase).
CREATE FUNCTION kc_session_history(p_session_id uuid, p_event text, p_detail text)
RETURNS void
LANGUAGE sql
AS $$
    INSERT INTO stage_history (stage, ref_id, event, detail)
    SELECT 'allocation', ta.purchase_id, p_event,
           format('session %s on %s at %s: %s', ts.session_number, ts.scheduled_date,
                  to_char(ts.scheduled_time, 'HH24:MI'), p_detail)
    FROM tutoring_sessions ts JOIN trainer_allocations ta ON ta.id = ts.allocation_id
    WHERE ts.id = p_session_id
$$;

CREATE FUNCTION kc_trainer_label(p_trainer uuid) RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT format('trainer %s (%s)', p_trainer,
                    coalesce((SELECT full_name FROM trainers WHERE id = p_trainer), '?')) $$;

-- One substituting transaction at a time (see the top of this file).
CREATE FUNCTION kc_lock_substitutions() RETURNS void
LANGUAGE sql
AS $$ SELECT pg_advisory_xact_lock(hashtextextended('kc-substitutions', 0)) $$;

-- Locks the purchases of these sessions, in id order, then the sessions.
CREATE FUNCTION kc_lock_sessions(p_sessions uuid[]) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM 1 FROM student_course_purchases pu
    WHERE pu.id IN (SELECT ta.purchase_id FROM tutoring_sessions ts
                    JOIN trainer_allocations ta ON ta.id = ts.allocation_id
                    WHERE ts.id = ANY (p_sessions))
    ORDER BY pu.id FOR UPDATE OF pu;
    PERFORM 1 FROM tutoring_sessions WHERE id = ANY (p_sessions) ORDER BY id FOR UPDATE;
END
$$;

-- Gives one session (locked by the caller) to a substitute: p_named, or the best who fits.
-- Each candidate is checked again under their lock, in a block that is rolled back (and the
-- lock released) when they no longer fit; the update itself is checked by the no-overlap
-- constraint. Returns the substitute, or NULL with the reason nobody took it in p_why.
CREATE FUNCTION kc_substitute_one(p_session_id uuid, p_named uuid, p_leave bigint,
                                  OUT substitute uuid, OUT why text)
LANGUAGE plpgsql
AS $$
DECLARE
    v         tutoring_sessions%ROWTYPE;
    v_cand    uuid;
    v_tried   uuid[] := '{}';
    v_why     text;
BEGIN
    SELECT * INTO v FROM tutoring_sessions WHERE id = p_session_id;
    FOR attempt IN 1..5 LOOP
        v_cand := coalesce(p_named,
                           kc_best_substitute(p_session_id, v.scheduled_date, v.scheduled_time));
        IF v_cand IS NULL OR v_cand = ANY (v_tried) THEN
            why := coalesce(v_why, 'no other trainer fits this session');
            RETURN;
        END IF;
        v_tried := v_tried || v_cand;
        BEGIN
            PERFORM kc_lock_trainer(v_cand);
            v_why := CASE WHEN v_cand = v.trainer_id THEN 'the trainer already has this session'
                          ELSE kc_substitute_fit(p_session_id, v_cand, true) END;
            IF v_why IS NOT NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'KCS01', MESSAGE = v_why;
            END IF;
            UPDATE tutoring_sessions
            SET trainer_id = v_cand,
                original_trainer_id = nullif(coalesce(original_trainer_id, trainer_id), v_cand),
                substitution_leave_id = CASE WHEN coalesce(original_trainer_id, trainer_id)
                                                  = v_cand THEN NULL ELSE p_leave END,
                substituted_at = CASE WHEN coalesce(original_trainer_id, trainer_id) = v_cand
                                      THEN NULL ELSE now() END
            WHERE id = p_session_id;
            substitute := v_cand;
            RETURN;
        EXCEPTION
            WHEN SQLSTATE 'KCS01' THEN
                v_why := SQLERRM;
            WHEN exclusion_violation THEN
                v_why := 'the trainer is busy then (another session overlaps)';
        END;
        IF p_named IS NOT NULL THEN
            why := v_why;
            RETURN;
        END IF;
    END LOOP;
    why := v_why;
END
$$;

-------------------------------------------------------------------------------------------------
-- Leave
-------------------------------------------------------------------------------------------------

CREATE FUNCTION kc_request_leave(p_trainer uuid, p_first_day date, p_last_day date,
                                 p_reason text, p_actor text)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_trainer trainers%ROWTYPE;
    v_other   trainer_leaves%ROWTYPE;
    v_leave   bigint;
BEGIN
    SELECT * INTO v_trainer FROM trainers WHERE id = p_trainer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no trainer %', p_trainer USING ERRCODE = 'no_data_found';
    END IF;
    IF p_first_day IS NULL OR p_last_day IS NULL THEN
        RAISE EXCEPTION 'a leave needs its first and last day' USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_last_day < p_first_day THEN
        RAISE EXCEPTION 'the last day % is before the first day %', p_last_day, p_first_day
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_last_day < kc_leave_today() THEN
        RAISE EXCEPTION 'a leave that ended on % is over: nothing is ahead to substitute',
            p_last_day USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_last_day - p_first_day >= 366 THEN
        RAISE EXCEPTION 'a leave is at most a year (% to % is % days)', p_first_day, p_last_day,
            p_last_day - p_first_day + 1 USING ERRCODE = 'invalid_parameter_value';
    ELSIF p_reason IS NULL OR btrim(p_reason) = '' OR length(p_reason) > 500 THEN
        RAISE EXCEPTION 'a leave needs a reason (1 to 500 characters)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One request at a time per trainer, so the overlap check below sees the other's row.
    PERFORM kc_lock_trainer_leaves(p_trainer);
    SELECT * INTO v_other FROM trainer_leaves l
    WHERE l.trainer_id = p_trainer AND l.status <> 'cancelled'
      AND daterange(l.first_day, l.last_day, '[]') && daterange(p_first_day, p_last_day, '[]')
    ORDER BY l.first_day LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'trainer % (%) already has leave % (%) from % to %', p_trainer,
            v_trainer.full_name, v_other.id, v_other.status, v_other.first_day,
            v_other.last_day USING ERRCODE = 'exclusion_violation',
            HINT = 'cancel it first, or ask for the days around it';
    END IF;
    INSERT INTO trainer_leaves (trainer_id, first_day, last_day, reason, requested_by)
    VALUES (p_trainer, p_first_day, p_last_day, btrim(p_reason), p_actor)
    RETURNING id INTO v_leave;
    RETURN v_leave;
END
$$;

CREATE FUNCTION kc_lock_trainer_leaves(p_trainer uuid) RETURNS void
LANGUAGE sql
AS $$ SELECT pg_advisory_xact_lock(hashtextextended('kc-leave:' || p_trainer::text, 0)) $$;

-- What approving or cancelling did to one session.
CREATE TYPE kc_leave_change AS (
    session_id     uuid,
    student_id     uuid,
    scheduled_date date,
    scheduled_time time,
    outcome        text,  -- substituted | cancelled | handed_over | given_back | kept
    trainer_id     uuid,  -- who has the session now
    detail         text
);

CREATE FUNCTION kc_approve_leave(p_leave bigint, p_handover_days integer, p_actor text)
RETURNS SETOF kc_leave_change
LANGUAGE plpgsql
AS $$
DECLARE
    v_leave    trainer_leaves%ROWTYPE;
    v_handover boolean;
    v_sessions uuid[];
    v_s        record;
    v_sub      record;
    v_counts   integer[] := '{0,0,0}';  -- substituted, cancelled, handed over
    v_row      kc_leave_change;
BEGIN
    IF p_handover_days IS NULL OR p_handover_days < 1 THEN
        RAISE EXCEPTION 'the hand-over bound is a number of days, 1 or more'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM kc_lock_substitutions();
    SELECT * INTO v_leave FROM trainer_leaves WHERE id = p_leave FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no leave %', p_leave USING ERRCODE = 'no_data_found';
    ELSIF v_leave.status <> 'requested' THEN
        RAISE EXCEPTION 'leave % is % already (by %, at %)', p_leave, v_leave.status,
            coalesce(v_leave.cancelled_by, v_leave.approved_by),
            coalesce(v_leave.cancelled_at, v_leave.approved_at)
            USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSIF v_leave.last_day < kc_leave_today() THEN
        RAISE EXCEPTION 'leave % ended on %: nothing is ahead to substitute', p_leave,
            v_leave.last_day USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    v_handover := v_leave.last_day - v_leave.first_day + 1 > p_handover_days;
    UPDATE trainer_leaves
    SET status = 'approved', approved_by = p_actor, approved_at = now(),
        handed_over = v_handover
    WHERE id = p_leave;

    -- The trainer's sessions in those days (the students' local dates), not started yet.
    SELECT array_agg(ts.id ORDER BY ts.starts_at, ts.id) INTO v_sessions
    FROM tutoring_sessions ts
    WHERE ts.trainer_id = v_leave.trainer_id AND ts.status = 'scheduled'
      AND ts.starts_at > now()
      AND ts.scheduled_date BETWEEN v_leave.first_day AND v_leave.last_day;
    PERFORM kc_lock_sessions(coalesce(v_sessions, '{}'));

    FOR v_s IN
        SELECT ts.id, ts.student_id, ts.scheduled_date, ts.scheduled_time, ts.trainer_id,
               ta.trainer_id AS course_trainer, ta.status AS allocation_status
        FROM unnest(coalesce(v_sessions, '{}')) WITH ORDINALITY AS u(id, n)
        JOIN tutoring_sessions ts ON ts.id = u.id
        JOIN trainer_allocations ta ON ta.id = ts.allocation_id
        WHERE ts.status = 'scheduled' AND ts.trainer_id = v_leave.trainer_id
        ORDER BY u.n
    LOOP
        v_row := (v_s.id, v_s.student_id, v_s.scheduled_date, v_s.scheduled_time, NULL,
                  v_s.trainer_id, NULL);
        IF v_handover AND v_s.course_trainer = v_leave.trainer_id
           AND v_s.allocation_status = 'approved' THEN
            -- The course goes to another trainer (below), not one session at a time.
            v_row.outcome := 'handed_over';
            v_row.detail := 'the course goes to the best other trainer (allocation stage)';
            v_counts[3] := v_counts[3] + 1;
            RETURN NEXT v_row;
            CONTINUE;
        END IF;
        v_sub := kc_substitute_one(v_s.id, NULL, p_leave);
        IF v_sub.substitute IS NOT NULL THEN
            v_row.outcome := 'substituted';
            v_row.trainer_id := v_sub.substitute;
            v_row.detail := format('%s in place of %s', kc_trainer_label(v_sub.substitute),
                                   kc_trainer_label(v_leave.trainer_id));
            PERFORM kc_session_history(v_s.id, 'substituted',
                                       format('%s, leave %s', v_row.detail, p_leave));
            v_counts[1] := v_counts[1] + 1;
        ELSE
            v_row.outcome := 'cancelled';
            v_row.detail := format('nobody can take it during %s''s leave %s: %s',
                                   kc_trainer_label(v_leave.trainer_id), p_leave, v_sub.why);
            -- Recorded before the cancellation, whose make-up line follows it.
            PERFORM kc_session_history(v_s.id, 'leave', 'cancelled, ' || v_row.detail);
            UPDATE tutoring_sessions
            SET status = 'cancelled', cancel_reason = v_row.detail,
                substitution_leave_id = p_leave
            WHERE id = v_s.id;
            v_counts[2] := v_counts[2] + 1;
        END IF;
        RETURN NEXT v_row;
    END LOOP;
    IF v_handover THEN
        PERFORM kc_check_trainers(ARRAY[v_leave.trainer_id]);
    END IF;
    UPDATE trainer_leaves
    SET outcome = format('approved: %s substituted, %s cancelled (make-ups follow)%s',
                         v_counts[1], v_counts[2],
                         CASE WHEN v_handover
                              THEN format(', %s in courses handed over (longer than %s days)',
                                          v_counts[3], p_handover_days)
                              ELSE '' END)
    WHERE id = p_leave;
END
$$;

CREATE FUNCTION kc_cancel_leave(p_leave bigint, p_actor text)
RETURNS SETOF kc_leave_change
LANGUAGE plpgsql
AS $$
DECLARE
    v_leave    trainer_leaves%ROWTYPE;
    v_sessions uuid[];
    v_s        record;
    v_why      text;
    v_counts   integer[] := '{0,0}';  -- given back, kept
    v_row      kc_leave_change;
BEGIN
    PERFORM kc_lock_substitutions();
    SELECT * INTO v_leave FROM trainer_leaves WHERE id = p_leave FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no leave %', p_leave USING ERRCODE = 'no_data_found';
    ELSIF v_leave.status = 'cancelled' THEN
        RAISE EXCEPTION 'leave % is cancelled already (by %, at %)', p_leave,
            v_leave.cancelled_by, v_leave.cancelled_at
            USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSIF v_leave.status = 'approved' AND v_leave.last_day < kc_leave_today() THEN
        RAISE EXCEPTION 'leave % ended on %: it can no longer be cancelled', p_leave,
            v_leave.last_day USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE trainer_leaves SET status = 'cancelled', cancelled_by = p_actor, cancelled_at = now()
    WHERE id = p_leave;
    IF v_leave.status = 'requested' THEN
        UPDATE trainer_leaves SET outcome = 'cancelled before approval' WHERE id = p_leave;
        RETURN;
    END IF;

    SELECT array_agg(ts.id ORDER BY ts.starts_at, ts.id) INTO v_sessions
    FROM tutoring_sessions ts
    WHERE ts.substitution_leave_id = p_leave AND ts.status = 'scheduled'
      AND ts.original_trainer_id IS NOT NULL AND ts.starts_at > now();
    PERFORM kc_lock_sessions(coalesce(v_sessions, '{}'));

    FOR v_s IN
        SELECT ts.id, ts.student_id, ts.scheduled_date, ts.scheduled_time, ts.trainer_id,
               ts.original_trainer_id
        FROM unnest(coalesce(v_sessions, '{}')) WITH ORDINALITY AS u(id, n)
        JOIN tutoring_sessions ts ON ts.id = u.id
        WHERE ts.status = 'scheduled' AND ts.substitution_leave_id = p_leave
        ORDER BY u.n
    LOOP
        v_row := (v_s.id, v_s.student_id, v_s.scheduled_date, v_s.scheduled_time, NULL,
                  v_s.trainer_id, NULL);
        BEGIN
            PERFORM kc_lock_trainer(v_s.original_trainer_id);
            v_why := kc_substitute_fit(v_s.id, v_s.original_trainer_id, false);
            IF v_why IS NOT NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'KCS01', MESSAGE = v_why;
            END IF;
            UPDATE tutoring_sessions
            SET trainer_id = original_trainer_id, original_trainer_id = NULL,
                substitution_leave_id = NULL, substituted_at = NULL
            WHERE id = v_s.id;
        EXCEPTION
            WHEN SQLSTATE 'KCS01' THEN
                NULL;
            WHEN exclusion_violation THEN
                v_why := 'the trainer is busy then (another session overlaps)';
        END;
        IF v_why IS NULL THEN
            v_row.outcome := 'given_back';
            v_row.trainer_id := v_s.original_trainer_id;
            v_row.detail := format('back to %s from %s, leave %s cancelled',
                                   kc_trainer_label(v_s.original_trainer_id),
                                   kc_trainer_label(v_s.trainer_id), p_leave);
            PERFORM kc_session_history(v_s.id, 'substitute_ended', v_row.detail);
            v_counts[1] := v_counts[1] + 1;
        ELSE
            v_row.outcome := 'kept';
            v_row.detail := format('stays with %s: %s cannot take it back: %s',
                                   kc_trainer_label(v_s.trainer_id),
                                   kc_trainer_label(v_s.original_trainer_id), v_why);
            v_counts[2] := v_counts[2] + 1;
        END IF;
        RETURN NEXT v_row;
    END LOOP;
    UPDATE trainer_leaves
    SET outcome = format('cancelled: %s given back, %s kept by their substitute%s',
                         v_counts[1], v_counts[2],
                         CASE WHEN v_leave.handed_over
                              THEN '; handed-over courses stay with their new trainer'
                              ELSE '' END)
    WHERE id = p_leave;
END
$$;

-- An operator's substitute for one session, without leave: p_trainer (every rule checked;
-- refused with the rule's sentence), or the best when NULL. Returns the substitute.
CREATE FUNCTION kc_substitute_session(p_session_id uuid, p_trainer uuid)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    v     record;
    v_sub record;
BEGIN
    PERFORM kc_lock_substitutions();
    PERFORM kc_lock_sessions(ARRAY[p_session_id]);
    SELECT ts.*, ta.status AS allocation_status, pu.is_active
    INTO v
    FROM tutoring_sessions ts
    JOIN trainer_allocations ta ON ta.id = ts.allocation_id
    JOIN student_course_purchases pu ON pu.id = ta.purchase_id
    WHERE ts.id = p_session_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no session %', p_session_id USING ERRCODE = 'no_data_found';
    ELSIF v.status <> 'scheduled' THEN
        RAISE EXCEPTION 'session % is %, not scheduled: only a scheduled session gets a '
                        'substitute', p_session_id, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSIF v.starts_at <= now() THEN
        RAISE EXCEPTION 'session % started at %: too late for a substitute', p_session_id,
            v.starts_at USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSIF v.allocation_status <> 'approved' OR NOT v.is_active THEN
        RAISE EXCEPTION 'session %''s course is not live (allocation %, purchase %)',
            p_session_id, v.allocation_status,
            CASE WHEN v.is_active THEN 'active' ELSE 'not active' END
            USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSIF p_trainer IS NOT NULL AND NOT EXISTS (SELECT 1 FROM trainers WHERE id = p_trainer) THEN
        RAISE EXCEPTION 'no trainer %', p_trainer USING ERRCODE = 'no_data_found';
    ELSIF p_trainer = v.trainer_id THEN
        RAISE EXCEPTION 'trainer % already has session %', p_trainer, p_session_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_sub := kc_substitute_one(p_session_id, p_trainer, NULL);
    IF v_sub.substitute IS NULL THEN
        IF p_trainer IS NULL THEN
            RAISE EXCEPTION 'nobody can take session % on % at %: %', p_session_id,
                v.scheduled_date, to_char(v.scheduled_time, 'HH24:MI'), v_sub.why
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        RAISE EXCEPTION '% cannot take session % on % at %: %', kc_trainer_label(p_trainer),
            p_session_id, v.scheduled_date, to_char(v.scheduled_time, 'HH24:MI'), v_sub.why
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM kc_session_history(p_session_id, 'substituted',
                               format('%s in place of %s (an operator''s substitute)',
                                      kc_trainer_label(v_sub.substitute),
                                      kc_trainer_label(v.trainer_id)));
    RETURN v_sub.substitute;
END
$$;

REVOKE EXECUTE ON FUNCTION kc_substitute_fit(uuid, uuid, boolean), kc_session_history(uuid, text, text),
    kc_trainer_label(uuid), kc_lock_substitutions(), kc_lock_sessions(uuid[]),
    kc_substitute_one(uuid, uuid, bigint), kc_request_leave(uuid, date, date, text, text),
    kc_lock_trainer_leaves(uuid), kc_approve_leave(bigint, integer, text),
    kc_cancel_leave(bigint, text), kc_substitute_session(uuid, uuid)
    FROM PUBLIC;

-------------------------------------------------------------------------------------------------
-- The operator functions (and the app's request), acting as who asks (migration 0014)
-------------------------------------------------------------------------------------------------

CREATE FUNCTION request_leave(p_trainer uuid, p_first_day date, p_last_day date,
                              p_reason text, p_session text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor text   := kc_begin_acting(kc_operator_actor(p_session));
    v_leave bigint := kc_request_leave(p_trainer, p_first_day, p_last_day, p_reason, v_actor);
BEGIN
    PERFORM kc_end_acting();
    RETURN v_leave;
END
$$;

CREATE FUNCTION approve_leave(p_leave bigint, p_handover_days integer DEFAULT 14,
                              p_session text DEFAULT NULL)
RETURNS SETOF kc_leave_change
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor text := kc_begin_acting(kc_operator_actor(p_session));
BEGIN
    RETURN QUERY SELECT * FROM kc_approve_leave(p_leave, p_handover_days, v_actor);
    PERFORM kc_end_acting();
END
$$;

CREATE FUNCTION cancel_leave(p_leave bigint, p_session text DEFAULT NULL)
RETURNS SETOF kc_leave_change
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor text := kc_begin_acting(kc_operator_actor(p_session));
BEGIN
    RETURN QUERY SELECT * FROM kc_cancel_leave(p_leave, v_actor);
    PERFORM kc_end_acting();
END
$$;

CREATE FUNCTION substitute_session(p_session_id uuid, p_trainer uuid DEFAULT NULL,
                                   p_session text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor      text := kc_begin_acting(kc_operator_actor(p_session));
    v_substitute uuid := kc_substitute_session(p_session_id, p_trainer);
BEGIN
    PERFORM kc_end_acting();
    RETURN v_substitute;
END
$$;

REVOKE EXECUTE ON FUNCTION request_leave(uuid, date, date, text, text),
    approve_leave(bigint, integer, text), cancel_leave(bigint, text),
    substitute_session(uuid, uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION request_leave(uuid, date, date, text, text),
    approve_leave(bigint, integer, text), cancel_leave(bigint, text),
    substitute_session(uuid, uuid, text) TO kc_operator;
-- The app's services (kc_app, migration 0018) may ask for leave and read the leaves; an
-- operator approves.
GRANT EXECUTE ON FUNCTION request_leave(uuid, date, date, text, text) TO kc_app;
GRANT SELECT ON trainer_leaves, trainer_session_substitutions TO kc_app;

-------------------------------------------------------------------------------------------------
-- A long leave hands the course over, as when a trainer leaves (migration 0009)
-------------------------------------------------------------------------------------------------

-- unfit_allocations (as migration 0018 left it) also names an approved allocation whose
-- trainer is on a leave approved as longer than the hand-over bound (handed_over) with a
-- session of it ahead in those days
-- (why = 'on_leave'): approve_leave enqueues it (kc_check_trainers), the allocation stage
-- moves what is ahead to the best other trainer, and sweep_lifecycle catches what it missed.

CREATE OR REPLACE VIEW unfit_allocations AS
SELECT ta.id AS allocation_id, ta.purchase_id, ta.student_id, ta.trainer_id, why.reason AS why,
       CASE why.reason
           WHEN 'inactive' THEN 'the trainer is inactive'
           WHEN 'no_specialty' THEN 'the trainer no longer teaches ' || c.title
           WHEN 'gender_mismatch' THEN 'the trainer no longer matches the student''s gender '
                                       || 'preference'
           WHEN 'out_of_range' THEN 'the student''s home is outside the trainer''s service radius'
           WHEN 'on_leave' THEN (
               SELECT format('the trainer is on leave from %s to %s (leave %s: %s), longer '
                             'than a substitute per session covers', l.first_day, l.last_day,
                             l.id, l.reason)
               FROM trainer_leaves l
               WHERE l.trainer_id = ta.trainer_id AND l.status = 'approved' AND l.handed_over
                 AND l.last_day >= kc_leave_today()
               ORDER BY l.first_day LIMIT 1)
           ELSE 'the trainer''s availability no longer covers the slot on a session day'
       END AS detail
FROM trainer_allocations ta
JOIN trainers t ON t.id = ta.trainer_id
JOIN students s ON s.id = ta.student_id
JOIN courses c ON c.id = ta.course_id
JOIN student_course_purchases pu ON pu.id = ta.purchase_id
CROSS JOIN LATERAL (
    SELECT coalesce((ta.metadata #>> '{assignment,override}')::boolean, false) AS overridden
) o
CROSS JOIN LATERAL (
    SELECT CASE
        WHEN t.status <> 'active' THEN 'inactive'
        WHEN NOT o.overridden AND NOT t.specialties_norm && array_remove(
                 ARRAY[lower(btrim(c.category)), lower(btrim(c.subcategory))], NULL)
            THEN 'no_specialty'
        WHEN NOT o.overridden AND lower(btrim(t.gender)) <> lower(btrim(s.gender))
            THEN 'gender_mismatch'
        WHEN NOT o.overridden
             AND kc_haversine_km(s.home_lat, s.home_lng, t.base_lat, t.base_lng)
                 > t.service_radius_km
            THEN 'out_of_range'
        WHEN EXISTS (
            SELECT 1
            FROM trainer_leaves l
            JOIN tutoring_sessions ts
              ON ts.allocation_id = ta.id AND ts.status = 'scheduled' AND ts.starts_at > now()
             AND ts.scheduled_date BETWEEN l.first_day AND l.last_day
            WHERE l.trainer_id = ta.trainer_id AND l.status = 'approved' AND l.handed_over)
            THEN 'on_leave'
        WHEN EXISTS (
            SELECT 1
            FROM (SELECT DISTINCT extract(isodow FROM ts.scheduled_date)::smallint AS weekday,
                         ts.scheduled_time AS slot_start,
                         kc_slot_end(ts.scheduled_time, ts.duration_minutes) AS slot_end
                  FROM tutoring_sessions ts
                  WHERE ts.allocation_id = ta.id AND ts.status = 'scheduled'
                    AND ts.starts_at > now() AND ts.trainer_id = ta.trainer_id
                  UNION ALL
                  SELECT d, pu.preferred_time_slot,
                         kc_slot_end(pu.preferred_time_slot, pu.session_duration_minutes)
                  FROM unnest(kc_mode_weekdays(pu.schedule_mode)) AS d
                  WHERE NOT EXISTS (SELECT 1 FROM tutoring_sessions x
                                    WHERE x.allocation_id = ta.id)) need
            WHERE NOT EXISTS (
                SELECT 1 FROM trainer_availability av
                WHERE av.trainer_id = ta.trainer_id AND av.weekday = need.weekday
                  AND av.slot_start <= need.slot_start AND av.slot_end >= need.slot_end))
            THEN 'unavailable'
    END AS reason
) why
WHERE ta.status = 'approved' AND why.reason IS NOT NULL
  AND (EXISTS (SELECT 1 FROM tutoring_sessions ts
               WHERE ts.allocation_id = ta.id AND ts.status = 'scheduled'
                 AND ts.starts_at > now())
       OR NOT EXISTS (SELECT 1 FROM tutoring_sessions ts WHERE ts.allocation_id = ta.id));

-------------------------------------------------------------------------------------------------
-- Events: a session that changes trainer (docs/events.md)
-------------------------------------------------------------------------------------------------

-- A scheduled session whose trainer_id changes at its own date and time (a substitute, or
-- the trainer back when a leave is cancelled): SESSION_SUBSTITUTED (0017's builder) and
-- three notifications: the student's "Trainer Substituted", and, as migration 0018 tells a
-- move's substitute, the trainer who had it "Session Reassigned" and the one who has it now
-- "Session Assigned" (the same keys and types, so the app knows one kind). A move that also
-- changes the trainer is told by 0018's trigger on its request (trainer_reschedules_approved),
-- so a change of date or time is left to it. The event and the student's notification have
-- emit_session_substituted's keys: a caller that still calls it adds nothing. A trigger of its
-- own beside tutoring_sessions_events_updated (which tells status changes), fired first
-- (trigger names sort).
CREATE FUNCTION trg_events_sessions_substituted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_stored integer;
BEGIN
    -- The changed rows first, on their own (MATERIALIZED): left to itself the planner built
    -- every row's events before comparing old with new (10 s for an UPDATE of 240 sessions
    -- that changed no trainer; 40 ms this way).
    WITH changed AS MATERIALIZED (
        SELECT n.id, n.starts_at, n.scheduled_date, n.scheduled_time, n.student_id,
               n.course_id, n.allocation_id, n.trainer_id AS now_trainer,
               o.trainer_id AS was_trainer
        FROM new_sessions n
        JOIN old_sessions o ON o.id = n.id
        WHERE n.trainer_id <> o.trainer_id AND n.status = 'scheduled'
          AND o.status = 'scheduled'
          AND (n.scheduled_date, n.scheduled_time) = (o.scheduled_date, o.scheduled_time)
    ), ch AS MATERIALIZED (
        SELECT c.*, ta.purchase_id, co.title, st.full_name AS student_name,
               tn.full_name AS now_name, tw.full_name AS was_name,
               kc_event_session_substituted(
                   c.id, c.was_trainer, c.now_trainer, c.student_id, c.scheduled_date,
                   c.scheduled_time, jsonb_build_object('purchaseId', ta.purchase_id), now())
                   AS event
        FROM changed c
        JOIN trainer_allocations ta ON ta.id = c.allocation_id
        JOIN courses co ON co.id = c.course_id
        JOIN students st ON st.id = c.student_id
        JOIN trainers tn ON tn.id = c.now_trainer
        JOIN trainers tw ON tw.id = c.was_trainer
    )
    SELECT kc_store_events(array_agg(e.purchase_id ORDER BY ch.starts_at, ch.id, e.k),
                           array_agg(e.payload ORDER BY ch.starts_at, ch.id, e.k))
    INTO v_stored
    FROM ch
    CROSS JOIN LATERAL (
        SELECT jsonb_build_object('trainerName', ch.now_name,
                                  'originalTrainerName', ch.was_name,
                                  'studentName', ch.student_name,
                                  'courseName', ch.title, 'type', 'session_substituted',
                                  'sessionId', ch.id, 'date', ch.scheduled_date::text,
                                  'timeSlot', kc_clock(ch.scheduled_time),
                                  'trainerId', ch.now_trainer,
                                  'originalTrainerId', ch.was_trainer,
                                  'courseId', ch.course_id, 'purchaseId', ch.purchase_id)
                   AS data,
               format('"%s" on %s at %s', ch.title, kc_long_date(ch.scheduled_date),
                      kc_clock(ch.scheduled_time)) AS what,
               'session_substituted:' || (ch.event ->> 'eventId') AS key,
               jsonb_build_object('purchaseId', ch.purchase_id) AS meta
    ) d
    CROSS JOIN LATERAL (VALUES
        (1, ch.purchase_id, ch.event),
        (2, ch.purchase_id, kc_event_notification(
            d.key, ch.student_id, 'student', 'session', 'Trainer Substituted',
            format('Trainer %s will take your session of %s in place of %s.', ch.now_name,
                   d.what, ch.was_name),
            d.data, d.meta, now())),
        (3, ch.purchase_id, kc_event_notification(
            'session_reassigned:' || (ch.event ->> 'eventId'), ch.was_trainer, 'trainer',
            'session', 'Session Reassigned',
            format('Your session of %s with %s will be taught by %s.', d.what,
                   ch.student_name, ch.now_name),
            d.data || jsonb_build_object('type', 'session_reassigned'), d.meta, now())),
        (4, ch.purchase_id, kc_event_notification(
            'session_assigned:' || (ch.event ->> 'eventId'), ch.now_trainer, 'trainer',
            'session', 'Session Assigned',
            format('You will teach %s for student %s, in place of %s.', d.what,
                   ch.student_name, ch.was_name),
            d.data || jsonb_build_object('type', 'session_assigned'), d.meta, now()))
    ) AS e(k, purchase_id, payload)
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION trg_events_sessions_substituted() FROM PUBLIC;

CREATE TRIGGER tutoring_sessions_events_substituted
    AFTER UPDATE ON tutoring_sessions
    REFERENCING OLD TABLE AS old_sessions NEW TABLE AS new_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION trg_events_sessions_substituted();
