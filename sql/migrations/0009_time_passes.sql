-- 0009 time passes: courses end and free their trainer, trainers leave or change, students
-- reschedule, cancelled sessions get a make-up.
--
-- Session statuses (tutoring_sessions.status):
--   scheduled  will happen; the only status that holds the trainer's time
--   completed  happened: marked by the app (attendance) or by complete_finished() once the
--              session ended more than the grace period ago
--   missed     the student did not show up: counts as delivered, no make-up
--   cancelled  will not happen. While the allocation is live, a session cancelled by the
--              trainer or the student leaves the purchase short, and the allocation stage
--              appends a make-up after the last session (trigger tutoring_sessions_makeup).
--              Sessions the pipeline cancels (refund, a move to another trainer, a
--              reschedule) are re-planned by that action itself.
-- A cancelled session stays cancelled and nothing goes back to scheduled; completed and
-- missed are for sessions that have started (trigger tutoring_sessions_guard_status).

ALTER TABLE tutoring_sessions
    DROP CONSTRAINT tutoring_sessions_status_check,
    ADD CONSTRAINT tutoring_sessions_status_check
        CHECK (status IN ('scheduled', 'completed', 'missed', 'cancelled'));

-- complete_finished() reads the oldest scheduled sessions that have ended.
CREATE INDEX tutoring_sessions_due_idx ON tutoring_sessions (ends_at) WHERE status = 'scheduled';

-- A finished course: is_active = false, deactivated_at = completed_at. The "one active
-- purchase per student and course" index then lets the student buy the course again. A
-- refunded purchase is inactive with completed_at NULL.
ALTER TABLE student_course_purchases
    ADD COLUMN completed_at timestamptz,
    ADD CONSTRAINT student_course_purchases_completed_check
        CHECK (completed_at IS NULL OR (NOT is_active AND deactivated_at IS NOT NULL));

-- trainer_left: the trainer of a live allocation can no longer teach it (inactive, specialty,
-- gender, radius, availability); rescheduled: the student asked for another slot, date or mode.
-- On the ended allocation these say why it ended; on a pending one, why it waits.
ALTER TABLE trainer_allocations
    DROP CONSTRAINT trainer_allocations_reason_check,
    ADD CONSTRAINT trainer_allocations_reason_check CHECK (reason IN (
        'no_trainer', 'no_specialty', 'gender_mismatch', 'out_of_range', 'no_free_slot',
        'too_far_between_sessions', 'at_capacity', 'trainer_inactive', 'refunded',
        'reassigned', 'trainer_left', 'rescheduled'));

-- completed: a course finished (ref: purchase); trainer_changed, rescheduled, makeup: why the
-- allocation stage was enqueued for a purchase (the detail says what happened).
ALTER TABLE stage_history
    DROP CONSTRAINT stage_history_event_check,
    ADD CONSTRAINT stage_history_event_check CHECK (event IN (
        'enqueued', 'succeeded', 'skipped', 'rejected', 'failed', 'replayed', 'healed',
        'refunded', 'completed', 'trainer_changed', 'rescheduled', 'makeup'));

-------------------------------------------------------------------------------------------------
-- Helpers
-------------------------------------------------------------------------------------------------

-- ISO weekdays a schedule mode uses (workers/schedule.py allowed_weekdays; a test compares).
CREATE FUNCTION kc_mode_weekdays(p_mode text) RETURNS smallint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT CASE p_mode WHEN 'daily' THEN '{1,2,3,4,5,6,7}'::smallint[]
                         WHEN 'weekdays' THEN '{1,2,3,4,5}'::smallint[]
                         WHEN 'sunday_only' THEN '{7}'::smallint[] END $$;

-- A clock time as the app writes it: '4:00 PM', '4 PM', '4pm', '16:00'. The grammar of
-- workers/metadata.py parse_clock (a hypothesis test compares the two).
CREATE FUNCTION kc_parse_clock(p_text text) RETURNS time
LANGUAGE plpgsql IMMUTABLE STRICT
AS $$
DECLARE
    v_parts  text[];
    v_hour   integer;
    v_minute integer;
BEGIN
    IF length(p_text) <= 200 THEN
        v_parts := regexp_match(
            p_text, '^\s*([0-9]{1,2})(?::([0-9]{2}))?\s*([ap]\.?\s*m\.?)?\s*$', 'i');
    END IF;
    IF v_parts IS NULL THEN
        RAISE EXCEPTION '% is not a time like ''4:00 PM'', ''4 PM'' or ''16:00''',
            quote_literal(left(p_text, 80)) USING ERRCODE = 'invalid_datetime_format';
    END IF;
    v_hour := v_parts[1]::integer;
    v_minute := coalesce(v_parts[2]::integer, 0);
    IF v_minute > 59 THEN
        RAISE EXCEPTION '%: minutes must be 00..59', quote_literal(p_text)
            USING ERRCODE = 'invalid_datetime_format';
    END IF;
    IF v_parts[3] IS NOT NULL THEN
        IF v_hour NOT BETWEEN 1 AND 12 THEN
            RAISE EXCEPTION '%: with AM/PM the hour must be 1..12', quote_literal(p_text)
                USING ERRCODE = 'invalid_datetime_format';
        END IF;
        v_hour := v_hour % 12 + CASE WHEN lower(left(v_parts[3], 1)) = 'p' THEN 12 ELSE 0 END;
    ELSIF v_parts[2] IS NULL THEN
        RAISE EXCEPTION '%: a 24-hour time needs minutes (''16:00''), or add AM/PM',
            quote_literal(p_text) USING ERRCODE = 'invalid_datetime_format';
    ELSIF v_hour > 23 THEN
        RAISE EXCEPTION '%: the hour must be 0..23', quote_literal(p_text)
            USING ERRCODE = 'invalid_datetime_format';
    END IF;
    RETURN make_time(v_hour, v_minute, 0);
END
$$;

-- When a session starting at p_start ends: 24:00 when it ends at midnight (as
-- workers/schedule.py slot_end; time arithmetic alone would wrap to 00:00).
CREATE FUNCTION kc_slot_end(p_start time, p_minutes integer) RETURNS time
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT CASE WHEN extract(epoch FROM p_start) + 60 * p_minutes >= 86400 THEN time '24:00'
                  ELSE p_start + make_interval(mins => p_minutes) END $$;

-- Enqueue the allocation stage for a purchase and say why in stage_history first.
CREATE FUNCTION kc_enqueue_allocation(p_purchase uuid, p_event text, p_detail text)
RETURNS bigint
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO stage_history (stage, ref_id, event, detail)
    VALUES ('allocation', p_purchase, p_event, p_detail);
    RETURN enqueue_stage('allocation', p_purchase);
END
$$;

-------------------------------------------------------------------------------------------------
-- Trainers who can no longer teach their students
-------------------------------------------------------------------------------------------------

-- Approved allocations whose trainer no longer meets the rules for what is still ahead: the
-- future scheduled sessions, or (sessions not written yet) the planned weekdays and slot.
-- An admin override (metadata.assignment.override) set aside specialty, gender and range;
-- an inactive trainer or missing availability is never set aside.
CREATE VIEW unfit_allocations AS
SELECT ta.id AS allocation_id, ta.purchase_id, ta.student_id, ta.trainer_id, why.reason AS why,
       CASE why.reason
           WHEN 'inactive' THEN 'the trainer is inactive'
           WHEN 'no_specialty' THEN 'the trainer no longer teaches ' || c.title
           WHEN 'gender_mismatch' THEN 'the trainer no longer matches the student''s gender '
                                       || 'preference'
           WHEN 'out_of_range' THEN 'the student''s home is outside the trainer''s service radius'
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
            FROM (SELECT DISTINCT extract(isodow FROM ts.scheduled_date)::smallint AS weekday,
                         ts.scheduled_time AS slot_start,
                         kc_slot_end(ts.scheduled_time, ts.duration_minutes) AS slot_end
                  FROM tutoring_sessions ts
                  WHERE ts.allocation_id = ta.id AND ts.status = 'scheduled'
                    AND ts.starts_at > now()
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

-- End a live allocation: cancelled with a reason (kept in metadata.ended too), its future
-- sessions cancelled; sessions that have started stay. The row is locked first, so a sessions
-- stage writing this allocation finishes before, and its sessions are cancelled as well.
-- Returns how many future sessions were cancelled.
CREATE FUNCTION end_allocation(p_allocation uuid, p_reason text, p_detail text)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_cancelled integer;
BEGIN
    PERFORM 1 FROM trainer_allocations WHERE id = p_allocation FOR UPDATE;
    UPDATE trainer_allocations
    SET status = 'cancelled', reason = p_reason, reason_detail = p_detail, updated_at = now(),
        metadata = metadata || jsonb_build_object('ended', jsonb_build_object(
            'reason', p_reason, 'detail', p_detail, 'at', now()))
    WHERE id = p_allocation AND status IN ('pending', 'approved');
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    UPDATE tutoring_sessions SET status = 'cancelled', cancelled_at = now()
    WHERE allocation_id = p_allocation AND status = 'scheduled' AND starts_at > now();
    GET DIAGNOSTICS v_cancelled = ROW_COUNT;
    RETURN v_cancelled;
END
$$;

-------------------------------------------------------------------------------------------------
-- Reschedule requests
-------------------------------------------------------------------------------------------------

-- reschedule() changes the purchase's schedule at once and records the request here; the
-- allocation stage re-plans the future sessions and closes it. Kept as the record of who
-- asked for what.
CREATE TABLE schedule_changes (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    purchase_id        uuid NOT NULL REFERENCES student_course_purchases (id),
    from_time_slot     time NOT NULL,
    to_time_slot       time NOT NULL,
    from_start_date    date NOT NULL,
    to_start_date      date NOT NULL,
    from_schedule_mode text NOT NULL,
    to_schedule_mode   text NOT NULL,
    requested_by       text NOT NULL DEFAULT session_user,
    requested_at       timestamptz NOT NULL DEFAULT now(),
    status             text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done')),
    outcome            text,
    decided_at         timestamptz,
    allocation_id      uuid REFERENCES trainer_allocations (id),
    CHECK ((status = 'open') = (decided_at IS NULL))
);
CREATE INDEX schedule_changes_open_idx ON schedule_changes (purchase_id, id)
    WHERE status = 'open';

-- reschedule(purchase, time_slot, start_date, schedule_mode): NULL keeps a value. The future
-- sessions are re-planned from the new start date (never before tomorrow), same trainer when
-- free, else the best one, else pending. Refuses, changing nothing: an unknown or inactive
-- purchase, nothing to change, a slot that does not parse or would run past midnight, an
-- unknown mode, a start date in the past (student's zone), a course with nothing ahead.
CREATE FUNCTION reschedule(p_purchase uuid, p_time_slot text DEFAULT NULL,
                           p_start_date date DEFAULT NULL, p_schedule_mode text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
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

-------------------------------------------------------------------------------------------------
-- Completion and the periodic safety net (the lifecycle cron job, workers/lifecycle.py)
-------------------------------------------------------------------------------------------------

-- One bounded, idempotent pass:
--  1. up to p_limit scheduled sessions that ended more than p_grace ago become completed;
--  2. up to p_limit approved allocations with nothing scheduled and every session the purchase
--     is owed behind it (not short of a make-up) become completed, and their purchases
--     finished (is_active = false, completed_at). The allocation trigger retries the
--     purchases waiting for that trainer. Each finished course is a 'completed' event.
-- Purchases are locked first (the allocation stage's order: purchase, then allocation); those
-- a stage holds right now wait for the next pass.
CREATE FUNCTION complete_finished(p_grace interval DEFAULT interval '1 hour',
                                  p_limit integer DEFAULT 2000)
RETURNS TABLE (sessions_completed integer, courses_completed integer)
LANGUAGE plpgsql
AS $$
DECLARE
    v_locked uuid[];
BEGIN
    WITH due AS (
        SELECT id FROM tutoring_sessions
        WHERE status = 'scheduled' AND ends_at < now() - p_grace
        ORDER BY ends_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tutoring_sessions ts SET status = 'completed' FROM due WHERE ts.id = due.id;
    GET DIAGNOSTICS sessions_completed = ROW_COUNT;

    SELECT coalesce(array_agg(l.id), '{}') INTO v_locked
    FROM (SELECT pu.id FROM student_course_purchases pu
          WHERE pu.is_active AND pu.id IN (
                SELECT ta.purchase_id FROM trainer_allocations ta
                WHERE ta.status = 'approved'
                  AND EXISTS (SELECT 1 FROM tutoring_sessions ts WHERE ts.allocation_id = ta.id)
                  AND NOT EXISTS (SELECT 1 FROM tutoring_sessions ts
                                  WHERE ts.allocation_id = ta.id AND ts.status = 'scheduled')
                ORDER BY ta.allocated_at
                LIMIT p_limit)
          FOR UPDATE SKIP LOCKED) l;

    -- A new statement: it sees what committed while the locks were taken.
    WITH finished AS (
        UPDATE trainer_allocations ta SET status = 'completed', updated_at = now()
        FROM student_course_purchases pu
        WHERE pu.id = ta.purchase_id AND pu.id = ANY (v_locked) AND pu.is_active
          AND ta.status = 'approved'
          AND NOT EXISTS (SELECT 1 FROM tutoring_sessions ts
                          WHERE ts.allocation_id = ta.id AND ts.status = 'scheduled')
          AND (SELECT count(*) FROM tutoring_sessions ts
               JOIN trainer_allocations a2 ON a2.id = ts.allocation_id
               WHERE a2.purchase_id = pu.id AND ts.status <> 'cancelled') >= pu.purchase_tier
          AND NOT EXISTS (SELECT 1 FROM schedule_changes sc
                          WHERE sc.purchase_id = pu.id AND sc.status = 'open')
          AND NOT EXISTS (SELECT 1 FROM allocation_requests r
                          WHERE r.purchase_id = pu.id AND r.status = 'open')
        RETURNING ta.id, ta.purchase_id, ta.trainer_id
    ), closed AS (
        UPDATE student_course_purchases pu
        SET is_active = false, deactivated_at = now(), completed_at = now()
        FROM finished f WHERE pu.id = f.purchase_id
        RETURNING pu.id
    )
    INSERT INTO stage_history (stage, ref_id, event, detail)
    SELECT 'allocation', f.purchase_id, 'completed',
           format('course finished: %s sessions completed, %s missed, %s cancelled; '
                  'allocation %s completed, trainer %s freed', n.completed, n.missed,
                  n.cancelled, f.id, f.trainer_id)
    FROM finished f
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE ts.status = 'completed') AS completed,
               count(*) FILTER (WHERE ts.status = 'missed') AS missed,
               count(*) FILTER (WHERE ts.status = 'cancelled') AS cancelled
        FROM tutoring_sessions ts JOIN trainer_allocations a ON a.id = ts.allocation_id
        WHERE a.purchase_id = f.purchase_id
    ) n;
    GET DIAGNOSTICS courses_completed = ROW_COUNT;
    RETURN NEXT;
END
$$;

-- The safety net for enqueues a running job swallowed (a job already 'picked' for the same
-- purchase absorbs a new enqueue): live allocations whose trainer can no longer teach them,
-- and reschedule requests open for over a minute, with no live allocation job, are enqueued
-- again, recorded as 'healed'. A job held as failed is left to the operator's replay.
-- Returns how many.
CREATE FUNCTION sweep_lifecycle(p_limit integer DEFAULT 500)
RETURNS integer
LANGUAGE sql
AS $$
    SELECT count(enqueue_stage('allocation', due.purchase_id, 'healed'))::integer
    FROM (
        SELECT DISTINCT d.purchase_id
        FROM (SELECT u.purchase_id FROM unfit_allocations u
              UNION ALL
              SELECT sc.purchase_id FROM schedule_changes sc
              WHERE sc.status = 'open' AND sc.requested_at < now() - interval '1 minute') d
        WHERE NOT EXISTS (SELECT 1 FROM pgqueuer j
                          WHERE j.dedupe_key = 'allocation:' || d.purchase_id
                            AND j.status IN ('queued', 'picked', 'failed'))
        LIMIT p_limit
    ) due
$$;

-------------------------------------------------------------------------------------------------
-- Triggers
-------------------------------------------------------------------------------------------------

CREATE FUNCTION trg_sessions_guard_status() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    ELSIF OLD.status = 'cancelled' THEN
        RAISE EXCEPTION 'session % (number %) is cancelled and stays cancelled', OLD.id,
            OLD.session_number
            USING ERRCODE = 'check_violation',
                  HINT = 'its time may be taken and a make-up may exist; reschedule instead';
    ELSIF NEW.status = 'scheduled' THEN
        RAISE EXCEPTION 'session % (number %) is % and cannot become scheduled again', OLD.id,
            OLD.session_number, OLD.status USING ERRCODE = 'check_violation';
    ELSIF NEW.status IN ('completed', 'missed') AND NEW.starts_at > now() THEN
        RAISE EXCEPTION 'session % (number %) starts at %: it can be marked % once it has '
                        'started', OLD.id, OLD.session_number, NEW.starts_at, NEW.status
            USING ERRCODE = 'check_violation';
    ELSIF NEW.status = 'cancelled' THEN
        NEW.cancelled_at := coalesce(NEW.cancelled_at, now());
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tutoring_sessions_guard_status
BEFORE UPDATE OF status ON tutoring_sessions
FOR EACH ROW EXECUTE FUNCTION trg_sessions_guard_status();


-- A session cancelled while its allocation is live leaves the purchase short: the allocation
-- stage appends a make-up (same trainer when free). A refund or a move ends the allocation
-- first, and an upgrade refund lowers the tier first, so their cancellations enqueue nothing.
CREATE FUNCTION trg_sessions_makeup() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_enqueue_allocation(short.purchase_id, 'makeup',
                                  'session(s) ' || short.numbers || ' cancelled')
    FROM (
        SELECT pu.id AS purchase_id,
               string_agg(n.session_number::text, ', ' ORDER BY n.session_number) AS numbers
        FROM new_sessions n
        JOIN old_sessions o ON o.id = n.id
        JOIN trainer_allocations ta ON ta.id = n.allocation_id
        JOIN student_course_purchases pu ON pu.id = ta.purchase_id
        WHERE n.status = 'cancelled' AND o.status <> 'cancelled'
          AND ta.status = 'approved' AND pu.is_active
          AND (SELECT count(*) FROM tutoring_sessions ts
               JOIN trainer_allocations a2 ON a2.id = ts.allocation_id
               WHERE a2.purchase_id = pu.id AND ts.status <> 'cancelled') < pu.purchase_tier
        GROUP BY pu.id
    ) short;
    RETURN NULL;
END
$$;

CREATE TRIGGER tutoring_sessions_makeup
AFTER UPDATE ON tutoring_sessions
REFERENCING OLD TABLE AS old_sessions NEW TABLE AS new_sessions
FOR EACH STATEMENT EXECUTE FUNCTION trg_sessions_makeup();

-- A trainer who changes (inactive, specialty, gender, radius, base) or whose availability
-- shrinks may no longer be able to teach their students: for each live allocation that the
-- trainer now fails, the allocation stage moves what is ahead to another trainer. (Replacing
-- availability by DELETE + INSERT in one transaction may enqueue a check that then finds the
-- trainer still fits: the stage decides on committed data.)
CREATE FUNCTION kc_check_trainers(p_trainers uuid[]) RETURNS integer
LANGUAGE sql
AS $$
    SELECT count(kc_enqueue_allocation(u.purchase_id, 'trainer_changed',
                                       'trainer ' || u.trainer_id || ': ' || u.detail))::integer
    FROM unfit_allocations u
    WHERE u.trainer_id = ANY (p_trainers)
$$;

CREATE FUNCTION trg_trainers_check_live_allocations() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_check_trainers(ARRAY[NEW.id]);
    RETURN NULL;
END
$$;

CREATE TRIGGER trainers_check_live_allocations
AFTER UPDATE OF status, specialties, gender, service_radius_km, base_lat, base_lng ON trainers
FOR EACH ROW EXECUTE FUNCTION trg_trainers_check_live_allocations();

CREATE FUNCTION trg_availability_check_live_allocations() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_check_trainers(ARRAY(SELECT DISTINCT trainer_id FROM removed_availability));
    RETURN NULL;
END
$$;

CREATE TRIGGER trainer_availability_removed
AFTER DELETE ON trainer_availability
REFERENCING OLD TABLE AS removed_availability
FOR EACH STATEMENT EXECUTE FUNCTION trg_availability_check_live_allocations();

CREATE TRIGGER trainer_availability_narrowed
AFTER UPDATE ON trainer_availability
REFERENCING OLD TABLE AS removed_availability
FOR EACH STATEMENT EXECUTE FUNCTION trg_availability_check_live_allocations();

-------------------------------------------------------------------------------------------------
-- Views: where each course stands; purchase_trace shows it
-------------------------------------------------------------------------------------------------

-- Per purchase: sessions by status, what is ahead, whether and when the course finished, and
-- the latest change of trainer or schedule (the last ended allocation's reason and sentence).
CREATE VIEW course_progress AS
SELECT pu.id AS purchase_id, pu.purchase_tier, pu.is_active, pu.completed_at,
       coalesce(n.completed, 0) AS sessions_completed,
       coalesce(n.missed, 0) AS sessions_missed,
       coalesce(n.cancelled, 0) AS sessions_cancelled,
       coalesce(n.ahead, 0) AS sessions_ahead,
       n.next_at AS next_session_at,
       ended.reason AS last_change, ended.reason_detail AS last_change_detail,
       ended.updated_at AS last_change_at
FROM student_course_purchases pu
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE ts.status = 'completed') AS completed,
           count(*) FILTER (WHERE ts.status = 'missed') AS missed,
           count(*) FILTER (WHERE ts.status = 'cancelled') AS cancelled,
           count(*) FILTER (WHERE ts.status = 'scheduled' AND ts.starts_at > now()) AS ahead,
           min(ts.starts_at) FILTER (WHERE ts.status = 'scheduled' AND ts.starts_at > now())
               AS next_at
    FROM tutoring_sessions ts JOIN trainer_allocations ta ON ta.id = ts.allocation_id
    WHERE ta.purchase_id = pu.id
) n ON true
LEFT JOIN LATERAL (
    SELECT ta.reason, ta.reason_detail, ta.updated_at FROM trainer_allocations ta
    WHERE ta.purchase_id = pu.id AND ta.status = 'cancelled'
      AND ta.reason IN ('reassigned', 'trainer_left', 'rescheduled')
    ORDER BY ta.updated_at DESC LIMIT 1
) ended ON true;

-- purchase_trace keeps every column it had (whatever earlier migrations made it) and gains the
-- course's progress: the former view lives on as purchase_stages.
ALTER VIEW purchase_trace RENAME TO purchase_stages;
CREATE VIEW purchase_trace AS
SELECT s.*, cp.completed_at, cp.sessions_completed, cp.sessions_missed, cp.sessions_cancelled,
       cp.sessions_ahead, cp.next_session_at, cp.last_change, cp.last_change_detail,
       cp.last_change_at
FROM purchase_stages s
LEFT JOIN course_progress cp ON cp.purchase_id = s.purchase_id;

-------------------------------------------------------------------------------------------------
-- Rights
-------------------------------------------------------------------------------------------------

-- Every object here belongs to kc_owner (sql/migrations/before_each.sql), so kc_operator
-- reads the new table and views through the owner's default privileges.
REVOKE EXECUTE ON FUNCTION reschedule(uuid, text, date, text),
    trg_sessions_makeup(), trg_trainers_check_live_allocations(),
    trg_availability_check_live_allocations() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION reschedule(uuid, text, date, text) TO kc_operator;

GRANT SELECT, UPDATE ON schedule_changes TO kc_worker;
GRANT SELECT ON unfit_allocations, course_progress, purchase_trace, purchase_stages TO kc_worker;
