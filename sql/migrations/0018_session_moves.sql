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
    IF extract(epoch FROM p_start) + 60 * v.duration_minutes > 86400 THEN
        RETURN format('ends_after_midnight: a %s-minute session at %s would end after midnight',
                      v.duration_minutes, kc_clock(p_start));
    END IF;
    IF EXISTS (SELECT 1 FROM holidays h WHERE h.day = p_date) THEN
        RETURN format('holiday: %s is a holiday (%s)', kc_long_date(p_date),
                      (SELECT h.reason FROM holidays h WHERE h.day = p_date));
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
LANGUAGE sql
STABLE
SET search_path = public, pg_temp
AS $$
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
      AND kc_session_fit(p_session_id, t.id, p_date, p_start, true) IS NULL
    ORDER BY lower(btrim(c.category)) = ANY (t.specialties_norm) DESC,
             (SELECT count(*) FROM trainer_allocations ta
               WHERE ta.trainer_id = t.id AND ta.status = 'approved'),
             coalesce(t.rating, 0) DESC,
             kc_haversine_km(s.home_lat, s.home_lng, t.base_lat, t.base_lng),
             t.id
    LIMIT 1
$$;

REVOKE EXECUTE ON FUNCTION kc_session_fit(uuid, uuid, date, time, boolean),
    kc_best_substitute(uuid, date, time) FROM PUBLIC;
-- Operators may ask either question from psql (they read every table the answer reads); the
-- functions that move sessions run as the owner.
GRANT EXECUTE ON FUNCTION kc_session_fit(uuid, uuid, date, time, boolean),
    kc_best_substitute(uuid, date, time) TO kc_operator;
