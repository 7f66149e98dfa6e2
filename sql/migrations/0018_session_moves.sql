-- 0018 One session at a time (issue 24, part A): whether one trainer can take one session at
-- a given local date and time, and the best other trainer who can.
--
-- The allocation stage matches a whole course (sql/queries/allocation.sql, candidate_facts,
-- with the rules in workers/rules/matching.py). Moving one session, or giving one session to
-- a substitute, asks the same question for one session: kc_session_fit answers it with the
-- rule's clause (NULL: the trainer can take it), kc_best_substitute ranks the others as the
-- matching ranks. Part B (a trainer's leave) and the moves below share both.

-------------------------------------------------------------------------------------------------
-- Settings the database itself needs
-------------------------------------------------------------------------------------------------

-- The moves are requested by the app (kc_app) and operators straight in SQL, with no worker
-- process and its environment in between, so the values their rules read live here, one row,
-- typed and checked. The owner changes them (`make psql`: UPDATE kc_settings SET ...).
CREATE TABLE kc_settings (
    singleton               boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The sequential-distance rule for one session (the allocation stage reads the worker's
    -- MAX_SEQUENTIAL_DISTANCE_KM; keep the two equal).
    max_sequential_km       double precision NOT NULL DEFAULT 5
                            CHECK (max_sequential_km > 0),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
INSERT INTO kc_settings DEFAULT VALUES;

-------------------------------------------------------------------------------------------------
-- One trainer, one session, one local date and start time
-------------------------------------------------------------------------------------------------

-- Whether a session of p_minutes may be at p_start on p_date at all, whoever teaches it:
-- NULL, or '<code>: <why>'. A session ends by midnight (the day is the schedule's unit, as
-- kc_reschedule says) and is never on a holiday.
CREATE FUNCTION kc_time_refusal(p_date date, p_start time, p_minutes integer) RETURNS text
LANGUAGE sql
STABLE
SET search_path = public, pg_temp
AS $$
    SELECT CASE
        WHEN extract(epoch FROM p_start) + 60 * p_minutes > 86400 THEN
            format('ends_after_midnight: a %s-minute session at %s would end after midnight',
                   p_minutes, kc_clock(p_start))
        WHEN h.day IS NOT NULL THEN
            format('holiday: %s is a holiday (%s)', kc_long_date(p_date), h.reason)
    END
    FROM (SELECT 1) one
    LEFT JOIN holidays h ON h.day = p_date
$$;

-- NULL when the trainer can take the session (its course, duration, delivery, the student's
-- home and time zone) on p_date at p_start, local to the student; otherwise '<code>: <why>',
-- the first rule it fails, as matching.explain_rule writes them. Always: the slot ends by
-- midnight, the day is no holiday, the student has no other session then, the trainer is
-- available that weekday over the whole slot, has no other scheduled session overlapping it
-- (the session itself aside: a move by half an hour overlaps where it was), and their home
-- sessions in the hour before or after are near this student's home (a home session only).
-- With p_full also the trainer's own rules, in the matching's order: active, specialty,
-- gender, service range. Capacity is not a rule here: one session is no allocation.
-- The no-overlap constraint on tutoring_sessions stays the last defence: this reads, it
-- locks nothing.
CREATE FUNCTION kc_session_fit(p_session_id uuid, p_trainer_id uuid, p_date date,
                               p_start time, p_full boolean)
RETURNS text
LANGUAGE plpgsql
STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
    v         record;
    t         record;
    v_starts  timestamptz;
    v_ends    timestamptz;
    v_end     time;
    v_km      double precision;
    v_max_km  double precision;
    v_n       integer;
    v_first   record;
    v_why     text;
BEGIN
    IF p_session_id IS NULL OR p_trainer_id IS NULL OR p_date IS NULL OR p_start IS NULL
       OR p_full IS NULL THEN
        RAISE EXCEPTION 'kc_session_fit needs a session, a trainer, a date, a start time and '
                        'whether to check every rule (true) or the time rules only (false)'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT ts.id, ts.student_id, ts.duration_minutes, ts.delivery, s.home_lat, s.home_lng,
           s.timezone, s.gender AS student_gender, c.title,
           array_remove(ARRAY[lower(btrim(c.category)), lower(btrim(c.subcategory))], NULL)
               AS teaches
    INTO v
    FROM tutoring_sessions ts
    JOIN students s ON s.id = ts.student_id
    JOIN courses c ON c.id = ts.course_id
    WHERE ts.id = p_session_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no session %', p_session_id USING ERRCODE = 'no_data_found';
    END IF;
    SELECT tr.id, tr.full_name, tr.status, tr.gender, tr.specialties_norm, tr.base_lat,
           tr.base_lng, tr.service_radius_km
    INTO t FROM trainers tr WHERE tr.id = p_trainer_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no trainer %', p_trainer_id USING ERRCODE = 'no_data_found';
    END IF;

    -- The time itself, whoever teaches.
    v_why := kc_time_refusal(p_date, p_start, v.duration_minutes);
    IF v_why IS NOT NULL THEN
        RETURN v_why;
    END IF;
    v_starts := (p_date + p_start) AT TIME ZONE v.timezone;
    v_ends := v_starts + make_interval(mins => v.duration_minutes);
    v_end := kc_slot_end(p_start, v.duration_minutes);
    SELECT o.scheduled_date, o.scheduled_time, c.title INTO v_first
    FROM tutoring_sessions o JOIN courses c ON c.id = o.course_id
    WHERE o.student_id = v.student_id AND o.status = 'scheduled' AND o.id <> p_session_id
      AND o.starts_at < v_ends AND o.ends_at > v_starts
    ORDER BY o.starts_at LIMIT 1;
    IF FOUND THEN
        RETURN format('student_busy: the student already has a session of %s on %s at %s',
                      v_first.title, kc_long_date(v_first.scheduled_date),
                      kc_clock(v_first.scheduled_time));
    END IF;

    -- The trainer's own rules, in the matching's order (workers/rules/matching.py, RULES).
    IF p_full THEN
        IF t.status <> 'active' THEN
            RETURN format('trainer_inactive: trainer %s is not active', t.full_name);
        END IF;
        IF NOT (t.specialties_norm && v.teaches) THEN
            RETURN format('no_specialty: trainer %s does not teach %s', t.full_name, v.title);
        END IF;
        IF NOT (t.gender IS NULL OR v.student_gender IS NULL
                OR lower(btrim(t.gender)) = lower(btrim(v.student_gender))) THEN
            RETURN format('gender_mismatch: trainer %s''s gender does not match the student''s '
                          'preference', t.full_name);
        END IF;
        v_km := kc_haversine_km(v.home_lat, v.home_lng, t.base_lat, t.base_lng);
        IF v_km > t.service_radius_km THEN
            RETURN format('out_of_range: the student''s home is %s km from trainer %s''s base, '
                          'beyond the %s km service radius', round(v_km::numeric, 1),
                          t.full_name, trim_scale(t.service_radius_km));
        END IF;
    END IF;

    -- Free at that time: available over the whole slot that weekday, and nothing overlapping.
    IF NOT EXISTS (SELECT 1 FROM trainer_availability a
                   WHERE a.trainer_id = p_trainer_id
                     AND a.weekday = extract(isodow FROM p_date)
                     AND a.slot_start <= p_start AND a.slot_end >= v_end) THEN
        RETURN format('no_free_slot: trainer %s is not available on %ss from %s to %s',
                      t.full_name, to_char(p_date, 'FMDay'), kc_clock(p_start),
                      kc_clock(v_end));
    END IF;
    SELECT count(*) OVER () AS n, o.scheduled_date, o.scheduled_time INTO v_first
    FROM tutoring_sessions o
    WHERE o.trainer_id = p_trainer_id AND o.status = 'scheduled' AND o.id <> p_session_id
      AND o.starts_at < v_ends AND o.ends_at > v_starts
    ORDER BY o.starts_at LIMIT 1;
    IF FOUND THEN
        RETURN format('no_free_slot: trainer %s already has a session on %s at %s',
                      t.full_name, kc_long_date(v_first.scheduled_date),
                      kc_clock(v_first.scheduled_time));
    END IF;

    -- Time promised to an approved allocation whose sessions are not written yet (the
    -- sessions stage writes them moments later; the allocation stage counts them too:
    -- trainer_unscheduled_allocations): its slot, on its mode's weekdays, from its first day.
    IF EXISTS (
        SELECT 1
        FROM trainer_allocations ta
        JOIN student_course_purchases pu ON pu.id = ta.purchase_id
        JOIN students os ON os.id = ta.student_id
        CROSS JOIN LATERAL (VALUES (p_date - 1), (p_date), (p_date + 1)) d(day)
        WHERE ta.trainer_id = p_trainer_id AND ta.status = 'approved'
          AND NOT EXISTS (SELECT 1 FROM tutoring_sessions x WHERE x.allocation_id = ta.id)
          AND d.day >= ta.first_session_date
          AND extract(isodow FROM d.day)::smallint = ANY (kc_mode_weekdays(pu.schedule_mode))
          AND (d.day + pu.preferred_time_slot) AT TIME ZONE os.timezone < v_ends
          AND (d.day + pu.preferred_time_slot) AT TIME ZONE os.timezone
              + make_interval(mins => pu.session_duration_minutes) > v_starts) THEN
        RETURN format('no_free_slot: trainer %s was just given another student at that time '
                      '(their sessions are being written)', t.full_name);
    END IF;

    -- Sequential distance (matching rule 7): the trainer's home sessions ending in the hour
    -- before, or starting in the hour after, a home session must be near this student's home.
    IF v.delivery = 'home' THEN
        SELECT s.max_sequential_km INTO v_max_km FROM kc_settings s;
        SELECT count(*) INTO v_n
        FROM tutoring_sessions o
        JOIN students other ON other.id = o.student_id
        WHERE o.trainer_id = p_trainer_id AND o.status = 'scheduled' AND o.id <> p_session_id
          AND o.delivery = 'home'
          AND o.starts_at < v_ends + interval '1 hour'
          AND o.ends_at > v_starts - interval '1 hour'
          AND kc_haversine_km(other.home_lat, other.home_lng, v.home_lat, v.home_lng) > v_max_km;
        IF v_n > 0 THEN
            RETURN format('too_far_between_sessions: %s of trainer %s''s sessions in the hour '
                          'before or after are at a home more than %s km from this student''s',
                          v_n, t.full_name, v_max_km);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

-- The best trainer other than the session's own who passes every rule of kc_session_fit for
-- that one session at that local date and time; NULL when nobody does. Ranked as the matching
-- ranks (docs/matching.md): category before subcategory, fewer live allocations, higher
-- rating, shorter distance, then id. Capacity is no rule: a substitute teaches one session,
-- not a course, so it takes no place among their live allocations.
CREATE FUNCTION kc_best_substitute(p_session_id uuid, p_date date, p_start time)
RETURNS uuid
LANGUAGE plpgsql
STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
    v_candidate uuid;
BEGIN
    -- The ranking does not depend on the rules, so the candidates are ranked first and
    -- kc_session_fit (which decides) runs in rank order until one fits: usually once, not
    -- once per trainer who teaches the course. The specialty (through its index) and the
    -- range pass over those who could not fit anyway.
    FOR v_candidate IN
        SELECT t.id
        FROM tutoring_sessions ts
        JOIN students s ON s.id = ts.student_id
        JOIN courses c ON c.id = ts.course_id
        JOIN trainers t
          ON t.status = 'active'
         AND t.id <> ts.trainer_id
         AND t.specialties_norm && array_remove(ARRAY[lower(btrim(c.category)),
                                                      lower(btrim(c.subcategory))], NULL)
        WHERE ts.id = p_session_id
          AND kc_haversine_km(s.home_lat, s.home_lng, t.base_lat, t.base_lng)
              <= t.service_radius_km
        ORDER BY lower(btrim(c.category)) = ANY (t.specialties_norm) DESC,
                 (SELECT count(*) FROM trainer_allocations ta
                   WHERE ta.trainer_id = t.id AND ta.status = 'approved'),
                 coalesce(t.rating, 0) DESC,
                 kc_haversine_km(s.home_lat, s.home_lng, t.base_lat, t.base_lng),
                 t.id
    LOOP
        IF kc_session_fit(p_session_id, v_candidate, p_date, p_start, true) IS NULL THEN
            RETURN v_candidate;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

REVOKE EXECUTE ON FUNCTION kc_time_refusal(date, time, integer),
    kc_session_fit(uuid, uuid, date, time, boolean),
    kc_best_substitute(uuid, date, time) FROM PUBLIC;
-- Operators may ask either question from psql (they read every table the answer reads); the
-- functions that move sessions run as the owner.
GRANT EXECUTE ON FUNCTION kc_session_fit(uuid, uuid, date, time, boolean),
    kc_best_substitute(uuid, date, time) TO kc_operator;

-------------------------------------------------------------------------------------------------
-- Moving one session: requests, in the app's field names (kc-backend trainer_reschedules)
-------------------------------------------------------------------------------------------------

-- How much notice a move needs (the new time at least this far from now), and whether a
-- request that passes every rule is carried out at once instead of waiting for an operator.
-- Here, not in the workers' environment: the app's services request moves straight in SQL.
ALTER TABLE kc_settings
    ADD COLUMN move_cutoff interval NOT NULL DEFAULT interval '12 hours'
        CHECK (move_cutoff >= interval '0' AND move_cutoff <= interval '30 days'),
    ADD COLUMN moves_auto_approve boolean NOT NULL DEFAULT false;

CREATE TABLE trainer_reschedules (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    session_id            uuid NOT NULL REFERENCES tutoring_sessions (id),
    allocation_id         uuid NOT NULL REFERENCES trainer_allocations (id),
    student_id            uuid NOT NULL REFERENCES students (id),
    -- The session's trainer when it was asked for (the original trainer of a substitution).
    trainer_id            uuid NOT NULL REFERENCES trainers (id),
    -- Who asked: decided by the database (the login, or console:<operator>), never a value a
    -- caller chooses; request_type says for whom (the app's student or trainer, an operator).
    requested_by          text NOT NULL,
    request_type          text NOT NULL CHECK (request_type IN ('student', 'trainer', 'operator')),
    original_date         date NOT NULL,
    original_time         time NOT NULL,
    new_date              date NOT NULL,
    new_time              time NOT NULL,
    reason                text NOT NULL CHECK (btrim(reason) <> '' AND length(reason) <= 1000),
    notes                 text CHECK (length(notes) <= 4000),
    status                text NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'approved', 'rejected', 'cancelled')),
    reviewed_by           text,
    reviewed_at           timestamptz,
    rejection_reason      text,
    -- Approved with a substitute: who took the session (trainer_id stays the original).
    substitute_trainer_id uuid REFERENCES trainers (id),
    outcome               text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'pending') = (reviewed_at IS NULL)),
    CHECK ((status = 'pending') = (reviewed_by IS NULL)),
    CHECK ((status = 'rejected') = (rejection_reason IS NOT NULL)),
    CHECK (status = 'approved' OR substitute_trainer_id IS NULL),
    CHECK (substitute_trainer_id IS DISTINCT FROM trainer_id),
    CHECK ((new_date, new_time) <> (original_date, original_time))
);
-- One pending request per session: the last defence behind the request's own check.
CREATE UNIQUE INDEX trainer_reschedules_one_pending_idx
    ON trainer_reschedules (session_id) WHERE status = 'pending';
CREATE INDEX trainer_reschedules_allocation_idx ON trainer_reschedules (allocation_id);
CREATE INDEX trainer_reschedules_pending_idx
    ON trainer_reschedules (created_at) WHERE status = 'pending';

-- History of a purchase's moves (stage 'allocation', ref: the purchase, as its other events).
ALTER TABLE stage_history
    DROP CONSTRAINT stage_history_event_check,
    ADD CONSTRAINT stage_history_event_check CHECK (event IN (
        'enqueued', 'succeeded', 'skipped', 'rejected', 'failed', 'replayed', 'healed',
        'refunded', 'completed', 'trainer_changed', 'rescheduled', 'makeup',
        'assign_requested', 'move_requested', 'move_approved', 'move_rejected',
        'move_cancelled'));

-- What a move may not do, whoever asks and whenever it is carried out (at the request, and
-- again at its approval, when time has passed): raises with a sentence a person can act on,
-- or returns the session's facts. The session must be scheduled and not started, its
-- allocation the purchase's live one and the purchase live; the new time (local to the
-- student) in the future by at least the cut-off, on no holiday, ending by midnight, and not
-- where the session already is.
CREATE FUNCTION kc_check_move(p_session_id uuid, p_date date, p_time time,
                              OUT session_id uuid, OUT allocation_id uuid,
                              OUT purchase_id uuid, OUT student_id uuid, OUT trainer_id uuid,
                              OUT session_number integer, OUT old_date date,
                              OUT old_time time, OUT old_starts timestamptz,
                              OUT new_starts timestamptz, OUT new_ends timestamptz,
                              OUT timezone text, OUT learning_mode text)
LANGUAGE plpgsql
STABLE
SET search_path = public, pg_temp
AS $$
DECLARE
    v        record;
    v_cutoff interval;
    v_why    text;
BEGIN
    IF p_session_id IS NULL OR p_date IS NULL OR p_time IS NULL THEN
        RAISE EXCEPTION 'a move names the session, the new date and the new time'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT ts.id, ts.allocation_id, ta.purchase_id, ts.student_id, ts.trainer_id,
           ts.session_number, ts.scheduled_date, ts.scheduled_time, ts.starts_at,
           ts.duration_minutes, ts.status, ta.status AS allocation_status, pu.is_active,
           pu.completed_at, pu.learning_mode, s.timezone
    INTO v
    FROM tutoring_sessions ts
    JOIN trainer_allocations ta ON ta.id = ts.allocation_id
    JOIN student_course_purchases pu ON pu.id = ta.purchase_id
    JOIN students s ON s.id = ts.student_id
    WHERE ts.id = p_session_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no session %', p_session_id USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT v.is_active OR v.allocation_status <> 'approved' THEN
        RAISE EXCEPTION 'the purchase of session % is not live (%): nothing of it moves',
            p_session_id, CASE WHEN v.completed_at IS NOT NULL THEN 'finished'
                               WHEN NOT v.is_active THEN 'refunded'
                               ELSE 'its allocation is ' || v.allocation_status END
            USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSIF v.status <> 'scheduled' THEN
        RAISE EXCEPTION 'session % (number %) is %: only a scheduled session moves',
            p_session_id, v.session_number, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSIF v.starts_at <= now() THEN
        RAISE EXCEPTION 'session % (number %) started at % (%): a session that has started '
                        'does not move', p_session_id, v.session_number,
            to_char(v.starts_at AT TIME ZONE v.timezone, 'YYYY-MM-DD HH24:MI'), v.timezone
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF (p_date, p_time) = (v.scheduled_date, v.scheduled_time) THEN
        RAISE EXCEPTION 'nothing changes: session % is already on % at %', p_session_id,
            kc_long_date(p_date), kc_clock(p_time) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    new_starts := (p_date + p_time) AT TIME ZONE v.timezone;
    new_ends := new_starts + make_interval(mins => v.duration_minutes);
    SELECT s.move_cutoff INTO v_cutoff FROM kc_settings s;
    IF new_starts <= now() THEN
        RAISE EXCEPTION 'the new time, % at % (%), is in the past', kc_long_date(p_date),
            kc_clock(p_time), v.timezone USING ERRCODE = 'invalid_parameter_value';
    ELSIF new_starts < now() + v_cutoff THEN
        RAISE EXCEPTION 'the new time, % at % (%), is less than % from now: a move needs that '
                        'much notice', kc_long_date(p_date), kc_clock(p_time), v.timezone,
            v_cutoff USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_why := kc_time_refusal(p_date, p_time, v.duration_minutes);
    IF v_why IS NOT NULL THEN
        RAISE EXCEPTION 'the new time does not work: %', v_why
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    session_id := v.id;
    allocation_id := v.allocation_id;
    purchase_id := v.purchase_id;
    student_id := v.student_id;
    trainer_id := v.trainer_id;
    session_number := v.session_number;
    old_date := v.scheduled_date;
    old_time := v.scheduled_time;
    old_starts := v.starts_at;
    timezone := v.timezone;
    learning_mode := v.learning_mode;
END
$$;

-- Puts the session at its new time (and with p_trainer, when given), then keeps the numbers
-- of the allocation's standing sessions in time order: the sessions the move passed and the
-- moved one share their numbers among them in order of start, and each takes the delivery its
-- number gives (a hybrid course keeps its online/home pattern). Cancelled sessions keep
-- theirs. Returns the numbers that changed ('' when none did).
CREATE FUNCTION kc_place_session(p_session_id uuid, p_date date, p_time time,
                                 p_trainer uuid) RETURNS text
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    v         record;
    v_ids     uuid[];
    v_numbers integer[];
    v_changed text;
BEGIN
    SELECT ts.allocation_id, ts.starts_at AS old_starts, ts.duration_minutes,
           (p_date + p_time) AT TIME ZONE s.timezone AS new_starts, pu.learning_mode
    INTO v
    FROM tutoring_sessions ts
    JOIN students s ON s.id = ts.student_id
    JOIN trainer_allocations ta ON ta.id = ts.allocation_id
    JOIN student_course_purchases pu ON pu.id = ta.purchase_id
    WHERE ts.id = p_session_id;
    UPDATE tutoring_sessions
    SET scheduled_date = p_date, scheduled_time = p_time, starts_at = v.new_starts,
        ends_at = v.new_starts + make_interval(mins => v.duration_minutes),
        trainer_id = coalesce(p_trainer, trainer_id)
    WHERE id = p_session_id;
    SELECT array_agg(ids.id ORDER BY ids.session_number),
           array_agg(nums.session_number ORDER BY ids.session_number),
           string_agg(ids.session_number || '->' || nums.session_number, ', '
                      ORDER BY ids.session_number)
    INTO v_ids, v_numbers, v_changed
    FROM (SELECT w.id, w.session_number, row_number() OVER (ORDER BY w.starts_at, w.id) AS k
          FROM tutoring_sessions w
          WHERE w.allocation_id = v.allocation_id AND w.status <> 'cancelled'
            AND (w.id = p_session_id
                 OR w.starts_at BETWEEN least(v.old_starts, v.new_starts)
                                    AND greatest(v.old_starts, v.new_starts))) ids
    JOIN (SELECT w.session_number, row_number() OVER (ORDER BY w.session_number) AS k
          FROM tutoring_sessions w
          WHERE w.allocation_id = v.allocation_id AND w.status <> 'cancelled'
            AND (w.id = p_session_id
                 OR w.starts_at BETWEEN least(v.old_starts, v.new_starts)
                                    AND greatest(v.old_starts, v.new_starts))) nums
      USING (k)
    WHERE ids.session_number <> nums.session_number;
    -- Two steps: UNIQUE (allocation_id, session_number) is checked row by row.
    UPDATE tutoring_sessions ts
    SET session_number = r.number + 10000,
        delivery = kc_session_delivery(v.learning_mode, r.number + 10000)
    FROM unnest(v_ids, v_numbers) AS r(id, number) WHERE ts.id = r.id;
    UPDATE tutoring_sessions ts
    SET session_number = r.number, delivery = kc_session_delivery(v.learning_mode, r.number)
    FROM unnest(v_ids, v_numbers) AS r(id, number) WHERE ts.id = r.id;
    RETURN coalesce(v_changed, '');
END
$$;

-- Carries out a pending request, in one transaction, or raises (changing nothing) with the
-- rule the session's trainer fails at the new time. With p_substitute, when the trainer does
-- not fit, the best other trainer who fits every rule (kc_best_substitute) takes the session
-- at the new time; the request keeps the original trainer (trainer_id) beside the
-- substitute. Locks in the allocation stage's order (docs/allocation-under-scarcity.md): the
-- request, the purchase, its allocation and the session, then one trainer's lock at a time,
-- each taken in a subtransaction that gives it back when that trainer does not fit.
CREATE FUNCTION kc_approve_move(p_request uuid, p_substitute boolean, p_reviewer text)
RETURNS text
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    r          trainer_reschedules%ROWTYPE;
    m          record;
    v_why      text;
    v_sub      uuid;
    v_tried    uuid[] := '{}';
    v_moved    text;
    v_trainer  text;
    v_outcome  text;
BEGIN
    SELECT * INTO r FROM trainer_reschedules WHERE id = p_request FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no move request %', p_request USING ERRCODE = 'no_data_found';
    ELSIF r.status <> 'pending' THEN
        RAISE EXCEPTION 'move request % is % already (by % at %)', p_request, r.status,
            r.reviewed_by, r.reviewed_at USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSIF p_substitute IS NULL THEN
        RAISE EXCEPTION 'substitute must be true or false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM student_course_purchases pu
    WHERE pu.id = (SELECT ta.purchase_id FROM trainer_allocations ta WHERE ta.id = r.allocation_id)
    FOR UPDATE;
    PERFORM 1 FROM trainer_allocations WHERE id = r.allocation_id FOR UPDATE;
    PERFORM 1 FROM tutoring_sessions WHERE id = r.session_id FOR UPDATE;
    -- What held at the request may not hold now (time passed, the session was cancelled).
    m := kc_check_move(r.session_id, r.new_date, r.new_time);

    BEGIN
        PERFORM kc_lock_trainer(m.trainer_id);
        v_moved := kc_place_session(r.session_id, r.new_date, r.new_time, NULL);
        -- Judged where the session now is: its delivery follows its new number.
        v_why := kc_session_fit(r.session_id, m.trainer_id, r.new_date, r.new_time, false);
        IF v_why IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state', MESSAGE = v_why;
        END IF;
    EXCEPTION WHEN object_not_in_prerequisite_state OR exclusion_violation THEN
        -- Undone, the trainer's lock given back; the rule's sentence, from where it stands.
        v_why := coalesce(v_why, kc_session_fit(r.session_id, m.trainer_id, r.new_date,
                                                r.new_time, false),
                          'no_free_slot: ' || SQLERRM);
    END;

    IF v_why IS NOT NULL AND NOT p_substitute THEN
        RAISE EXCEPTION 'move request % cannot be approved: %', p_request, v_why
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'approve it with a substitute (the best other trainer who fits takes '
                         'the session then), or reject it with a reason';
    END IF;
    IF v_why IS NOT NULL THEN
        -- The best other trainer, checked again under their lock (another transaction may
        -- have booked them since the ranking); at most three tries.
        FOR i IN 1..3 LOOP
            v_sub := kc_best_substitute(r.session_id, r.new_date, r.new_time);
            EXIT WHEN v_sub IS NULL OR v_sub = ANY (v_tried);
            v_tried := v_tried || v_sub;
            BEGIN
                PERFORM kc_lock_trainer(v_sub);
                v_moved := kc_place_session(r.session_id, r.new_date, r.new_time, v_sub);
                IF kc_session_fit(r.session_id, v_sub, r.new_date, r.new_time, true)
                   IS NOT NULL THEN
                    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state';
                END IF;
                EXIT;
            EXCEPTION WHEN object_not_in_prerequisite_state OR exclusion_violation THEN
                v_sub := NULL;
            END;
        END LOOP;
        IF v_sub IS NULL THEN
            RAISE EXCEPTION 'move request % cannot be approved: %; and no other trainer fits '
                            'every rule for that session then', p_request, v_why
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'reject it with a reason, or ask for another time';
        END IF;
    END IF;

    SELECT full_name INTO v_trainer FROM trainers WHERE id = coalesce(v_sub, m.trainer_id);
    v_outcome := format('session %s moved from %s at %s to %s at %s with %s', m.session_number,
                        kc_long_date(m.old_date), kc_clock(m.old_time),
                        kc_long_date(r.new_date), kc_clock(r.new_time),
                        CASE WHEN v_sub IS NULL THEN 'trainer ' || v_trainer
                             ELSE 'substitute ' || v_trainer || ' (' || v_why || ')' END)
                 || CASE WHEN v_moved <> '' THEN '; renumbered ' || v_moved ELSE '' END;
    UPDATE trainer_reschedules
    SET status = 'approved', reviewed_by = p_reviewer, reviewed_at = now(),
        substitute_trainer_id = v_sub, outcome = v_outcome, updated_at = now()
    WHERE id = p_request;
    INSERT INTO stage_history (stage, ref_id, event, detail)
    VALUES ('allocation', m.purchase_id, 'move_approved',
            format('request %s (%s): %s', p_request, r.request_type, v_outcome));
    RETURN v_outcome;
END
$$;

-- A request to move one session (the app, for a student or a trainer; an operator), checked
-- at once: refused, changing nothing, with a sentence a person can act on (kc_check_move);
-- another pending request for the session refuses it too. With kc_settings.moves_auto_approve
-- it is carried out at once when the session's trainer fits; otherwise (or when they do not)
-- it waits for an operator. p_new_time takes the app's formats ('10:00', '10 AM', '4:00 PM').
CREATE FUNCTION request_session_move(p_session_id uuid, p_new_date date, p_new_time text,
                                     p_request_type text, p_reason text,
                                     p_notes text DEFAULT NULL, p_session text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor   text := kc_begin_acting(kc_operator_actor(p_session));
    v_time    time;
    m         record;
    v_pending uuid;
    v_request uuid;
    v_auto    boolean;
BEGIN
    IF p_request_type IS NULL OR p_request_type NOT IN ('student', 'trainer', 'operator') THEN
        RAISE EXCEPTION 'request_type is student, trainer or operator, not %',
            quote_nullable(left(p_request_type, 40)) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_request_type = 'operator' AND p_session IS NULL
       AND NOT pg_has_role(session_user, 'kc_operator', 'MEMBER') THEN
        RAISE EXCEPTION 'only an operator asks as an operator: the app asks for a student or '
                        'a trainer' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF nullif(btrim(p_reason), '') IS NULL THEN
        RAISE EXCEPTION 'a move needs a reason' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_time := kc_parse_clock(p_new_time);
    m := kc_check_move(p_session_id, p_new_date, v_time);
    SELECT id INTO v_pending FROM trainer_reschedules
    WHERE session_id = p_session_id AND status = 'pending';
    IF FOUND THEN
        RAISE EXCEPTION 'move request % for session % is pending: it is approved, rejected or '
                        'cancelled first', v_pending, p_session_id
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    BEGIN
        INSERT INTO trainer_reschedules (
            session_id, allocation_id, student_id, trainer_id, requested_by, request_type,
            original_date, original_time, new_date, new_time, reason, notes)
        VALUES (p_session_id, m.allocation_id, m.student_id, m.trainer_id, v_actor,
                p_request_type, m.old_date, m.old_time, p_new_date, v_time, btrim(p_reason),
                p_notes)
        RETURNING id INTO v_request;
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'another move request for session % is pending: it is approved, '
                        'rejected or cancelled first', p_session_id
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END;
    INSERT INTO stage_history (stage, ref_id, event, detail)
    VALUES ('allocation', m.purchase_id, 'move_requested',
            format('request %s (%s): session %s from %s at %s to %s at %s: %s', v_request,
                   p_request_type, m.session_number, kc_long_date(m.old_date),
                   kc_clock(m.old_time), kc_long_date(p_new_date), kc_clock(v_time),
                   btrim(p_reason)));
    SELECT moves_auto_approve INTO v_auto FROM kc_settings;
    IF v_auto THEN
        BEGIN
            PERFORM kc_approve_move(v_request, false, 'policy:moves_auto_approve');
        EXCEPTION WHEN object_not_in_prerequisite_state THEN
            NULL;  -- the trainer does not fit then: an operator decides (or a substitute)
        END;
    END IF;
    PERFORM kc_end_acting();
    RETURN v_request;
END
$$;

-- An operator approves: the move is carried out now, or refused with the rule's sentence
-- (p_substitute: the best other trainer takes the session instead). Two operators approving
-- the same request at once: the second waits for the first's row lock, then is refused.
CREATE FUNCTION approve_session_move(p_request uuid, p_substitute boolean DEFAULT false,
                                     p_session text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor   text := kc_begin_acting(kc_operator_actor(p_session));
    v_outcome text := kc_approve_move(p_request, p_substitute, v_actor);
BEGIN
    PERFORM kc_end_acting();
    RETURN v_outcome;
END
$$;

-- An operator rejects a pending request, with the reason the requester will read.
CREATE FUNCTION reject_session_move(p_request uuid, p_reason text, p_session text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor text := kc_begin_acting(kc_operator_actor(p_session));
    r       trainer_reschedules%ROWTYPE;
BEGIN
    IF nullif(btrim(p_reason), '') IS NULL OR length(p_reason) > 1000 THEN
        RAISE EXCEPTION 'a rejection needs a reason (at most 1000 characters)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO r FROM trainer_reschedules WHERE id = p_request FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no move request %', p_request USING ERRCODE = 'no_data_found';
    ELSIF r.status <> 'pending' THEN
        RAISE EXCEPTION 'move request % is % already (by % at %)', p_request, r.status,
            r.reviewed_by, r.reviewed_at USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE trainer_reschedules
    SET status = 'rejected', reviewed_by = v_actor, reviewed_at = now(),
        rejection_reason = btrim(p_reason), updated_at = now()
    WHERE id = p_request;
    INSERT INTO stage_history (stage, ref_id, event, detail)
    SELECT 'allocation', ta.purchase_id, 'move_rejected',
           format('request %s: %s', p_request, btrim(p_reason))
    FROM trainer_allocations ta WHERE ta.id = r.allocation_id;
    PERFORM kc_end_acting();
    RETURN format('move request %s rejected: %s', p_request, btrim(p_reason));
END
$$;

-- The requester (the app) or an operator withdraws a pending request.
CREATE FUNCTION cancel_session_move(p_request uuid, p_session text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_actor text := kc_begin_acting(kc_operator_actor(p_session));
    r       trainer_reschedules%ROWTYPE;
BEGIN
    SELECT * INTO r FROM trainer_reschedules WHERE id = p_request FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no move request %', p_request USING ERRCODE = 'no_data_found';
    ELSIF r.status <> 'pending' THEN
        RAISE EXCEPTION 'move request % is % already (by % at %)', p_request, r.status,
            r.reviewed_by, r.reviewed_at USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE trainer_reschedules
    SET status = 'cancelled', reviewed_by = v_actor, reviewed_at = now(), updated_at = now()
    WHERE id = p_request;
    INSERT INTO stage_history (stage, ref_id, event, detail)
    SELECT 'allocation', ta.purchase_id, 'move_cancelled', format('request %s', p_request)
    FROM trainer_allocations ta WHERE ta.id = r.allocation_id;
    PERFORM kc_end_acting();
    RETURN format('move request %s cancelled', p_request);
END
$$;

REVOKE EXECUTE ON FUNCTION
    kc_check_move(uuid, date, time), kc_place_session(uuid, date, time, uuid),
    kc_approve_move(uuid, boolean, text),
    request_session_move(uuid, date, text, text, text, text, text),
    approve_session_move(uuid, boolean, text), reject_session_move(uuid, text, text),
    cancel_session_move(uuid, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    request_session_move(uuid, date, text, text, text, text, text),
    approve_session_move(uuid, boolean, text), reject_session_move(uuid, text, text),
    cancel_session_move(uuid, text)
    TO kc_operator;

-- A session a substitute teaches is not its allocation's trainer's to be available for: the
-- availability rule of unfit_allocations (0009) reads only the sessions the allocation's own
-- trainer teaches. Without this, a substitution at a time the trainer cannot teach (the
-- reason for most substitutions) made the whole allocation unfit, and the next check (a
-- change of the trainer, sweep_lifecycle within ten minutes) moved the course away from them.
CREATE OR REPLACE VIEW unfit_allocations AS
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
-- kc_app: the app's own services
-------------------------------------------------------------------------------------------------

-- The app (kc-backend's services) writes what it writes today, the input tables (payments,
-- students, trainers and their availability, courses, holidays) and a session's attendance
-- (status: completed, missed, cancelled; docs/lifecycle.md), reads what the pipeline decided,
-- and asks for moves. It approves nothing: operators do. A cluster role, created when missing
-- by the migrating user (as kc_events in 0017).
RESET ROLE;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kc_app') THEN
        IF NOT (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user)
        THEN
            RAISE EXCEPTION 'role kc_app does not exist and % may not create roles',
                current_user USING HINT = 'as a superuser: CREATE ROLE kc_app NOLOGIN;';
        END IF;
        CREATE ROLE kc_app NOLOGIN;
    END IF;
END
$$;
SET LOCAL ROLE kc_owner;

GRANT SELECT, INSERT, UPDATE ON payments, students, trainers, courses TO kc_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON trainer_availability, holidays TO kc_app;
GRANT SELECT ON student_course_purchases, trainer_allocations, tutoring_sessions,
    trainer_reschedules, course_progress TO kc_app;
GRANT UPDATE (status, cancelled_at) ON tutoring_sessions TO kc_app;
GRANT EXECUTE ON FUNCTION
    request_session_move(uuid, date, text, text, text, text, text),
    cancel_session_move(uuid, text)
    TO kc_app;

-- Who may connect (0015) was decided before kc_app existed; as in 0017, granting CONNECT is
-- the database owner's: done as the login that migrates, then back to the migration's role.
SELECT set_config('kc.migration_role', current_user, true);
SET LOCAL ROLE NONE;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO kc_app', current_database());
END
$$;
DO $$
BEGIN
    EXECUTE format('SET LOCAL ROLE %I', current_setting('kc.migration_role'));
END
$$;

-------------------------------------------------------------------------------------------------
-- What the app hears of a move (docs/events.md)
-------------------------------------------------------------------------------------------------

-- An approved move writes, in its transaction: SESSION_RESCHEDULED and the student's
-- "Session Rescheduled" (emit_session_rescheduled, 0017), the trainer's own notification, and
-- with a substitute SESSION_SUBSTITUTED and the student's "Trainer Substituted"
-- (emit_session_substituted), the original trainer's "Session Reassigned" and the
-- substitute's "Session Assigned".
CREATE FUNCTION trg_reschedules_approved() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v       record;
    v_event uuid;
    v_old   text;
    v_new   text;
BEGIN
    SELECT ts.trainer_id, ts.student_id, ts.course_id, ta.purchase_id, co.title,
           st.full_name AS student, orig.full_name AS original, sub.full_name AS substitute
    INTO v
    FROM tutoring_sessions ts
    JOIN trainer_allocations ta ON ta.id = ts.allocation_id
    JOIN courses co ON co.id = ts.course_id
    JOIN students st ON st.id = ts.student_id
    JOIN trainers orig ON orig.id = NEW.trainer_id
    LEFT JOIN trainers sub ON sub.id = NEW.substitute_trainer_id
    WHERE ts.id = NEW.session_id;
    v_event := emit_session_rescheduled(NEW.session_id, NEW.original_date, NEW.original_time);
    v_old := kc_long_date(NEW.original_date) || ' at ' || kc_clock(NEW.original_time);
    v_new := kc_long_date(NEW.new_date) || ' at ' || kc_clock(NEW.new_time);
    IF NEW.substitute_trainer_id IS NULL THEN
        PERFORM kc_store_events(ARRAY[v.purchase_id], ARRAY[kc_event_notification(
            'session_rescheduled_trainer:' || v_event, NEW.trainer_id, 'trainer', 'session',
            'Session Rescheduled',
            format('Your session of "%s" with %s on %s has moved to %s.', v.title, v.student,
                   v_old, v_new),
            jsonb_build_object('studentName', v.student, 'courseName', v.title,
                               'type', 'session_rescheduled', 'sessionId', NEW.session_id,
                               'oldDate', NEW.original_date::text,
                               'newDate', NEW.new_date::text,
                               'oldTimeSlot', kc_clock(NEW.original_time),
                               'newTimeSlot', kc_clock(NEW.new_time),
                               'studentId', v.student_id, 'courseId', v.course_id,
                               'purchaseId', v.purchase_id),
            jsonb_build_object('purchaseId', v.purchase_id), now())]);
    ELSE
        v_event := emit_session_substituted(NEW.session_id, NEW.trainer_id);
        PERFORM kc_store_events(ARRAY[v.purchase_id, v.purchase_id], ARRAY[
            kc_event_notification(
                'session_reassigned:' || v_event, NEW.trainer_id, 'trainer', 'session',
                'Session Reassigned',
                format('Your session of "%s" with %s on %s has moved to %s and will be taught '
                       'by %s.', v.title, v.student, v_old, v_new, v.substitute),
                jsonb_build_object('studentName', v.student, 'courseName', v.title,
                                   'type', 'session_reassigned', 'sessionId', NEW.session_id,
                                   'oldDate', NEW.original_date::text,
                                   'oldTimeSlot', kc_clock(NEW.original_time),
                                   'substituteTrainerId', NEW.substitute_trainer_id,
                                   'studentId', v.student_id, 'courseId', v.course_id,
                                   'purchaseId', v.purchase_id),
                jsonb_build_object('purchaseId', v.purchase_id), now()),
            kc_event_notification(
                'session_assigned:' || v_event, NEW.substitute_trainer_id, 'trainer',
                'session', 'Session Assigned',
                format('You will teach "%s" for student %s on %s, in place of %s.', v.title,
                       v.student, v_new, v.original),
                jsonb_build_object('studentName', v.student, 'courseName', v.title,
                                   'type', 'session_assigned', 'sessionId', NEW.session_id,
                                   'date', NEW.new_date::text,
                                   'timeSlot', kc_clock(NEW.new_time),
                                   'originalTrainerId', NEW.trainer_id,
                                   'studentId', v.student_id, 'courseId', v.course_id,
                                   'purchaseId', v.purchase_id),
                jsonb_build_object('purchaseId', v.purchase_id), now())]);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER trainer_reschedules_approved
    AFTER UPDATE OF status ON trainer_reschedules
    FOR EACH ROW WHEN (NEW.status = 'approved' AND OLD.status = 'pending')
    EXECUTE FUNCTION trg_reschedules_approved();
REVOKE EXECUTE ON FUNCTION trg_reschedules_approved() FROM PUBLIC;
