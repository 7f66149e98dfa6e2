-- 0021: one SQL home for each rule the pipeline also has in Python (issue 27), and a comment
-- on every object of the project (part two, below).
--
-- Each function here is the SQL half of a pair whose Python half lives in workers/rules/;
-- tests/test_rule_pairs.py calls both on one table of inputs. kc_reschedule now calls them
-- instead of spelling the rules out again.

-------------------------------------------------------------------------------------------------
-- Rules in two languages
-------------------------------------------------------------------------------------------------

-- "Ends by midnight" (workers/rules/schedule.py, slot_end): the end of a session starting at
-- p_start, 24:00 when it ends exactly at midnight, NULL when it would run past midnight (no
-- end that day). Before, past midnight also gave 24:00 and kc_reschedule tested the rule
-- again on its own.
CREATE OR REPLACE FUNCTION kc_slot_end(p_start time, p_minutes integer) RETURNS time
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT CASE WHEN extract(epoch FROM p_start) + 60 * p_minutes = 86400 THEN time '24:00'
                  WHEN extract(epoch FROM p_start) + 60 * p_minutes < 86400
                  THEN p_start + make_interval(mins => p_minutes) END $$;

-- A schedule mode word as a payment's metadata reads it (workers/rules/metadata.py,
-- MODE_WORDS): ASCII only, case and separators (whitespace, '_', '-') ignored; NULL for a
-- word that is no mode. translate, not lower(): lower() follows the database's locale.
CREATE FUNCTION kc_mode_of(p_word text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT CASE regexp_replace(translate(p_word, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                                                   'abcdefghijklmnopqrstuvwxyz'),
                                 '[ \t\n\r\f\v_-]+', '', 'g')
                 WHEN 'daily' THEN 'daily'
                 WHEN 'everyday' THEN 'daily'
                 WHEN 'weekdaydaily' THEN 'daily'
                 WHEN 'weekdays' THEN 'weekdays'
                 WHEN 'sundayonly' THEN 'sunday_only'
                 WHEN 'sunday' THEN 'sunday_only'
                 WHEN 'sundayfocus' THEN 'sunday_only' END
      WHERE length(p_word) <= 200 $$;

-- The latest start date accepted on p_today (workers/rules/metadata.py, latest_start): a year
-- ahead, 28 February for 29 February, never past 9999-12-31 (Python's last date).
CREATE FUNCTION kc_latest_start(p_today date) RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT least((p_today + interval '1 year')::date, date '9999-12-31') $$;

-- The operator's reschedule, as in 0015, with the three rules above called, not spelled out.
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
    v_mode := coalesce(kc_mode_of(p_schedule_mode), v_purchase.schedule_mode);
    IF p_schedule_mode IS NOT NULL AND kc_mode_of(p_schedule_mode) IS NULL THEN
        RAISE EXCEPTION 'schedule mode % is not one of daily, weekdays, sunday_only (or a word '
                        'a payment may use: everyday, weekday_daily, sunday, sunday_focus)',
            quote_literal(left(p_schedule_mode, 80)) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT (now() AT TIME ZONE s.timezone)::date INTO v_today
    FROM students s WHERE s.id = v_purchase.student_id;
    IF p_start_date < v_today THEN
        RAISE EXCEPTION 'start date % is in the past (today is % in the student''s time zone)',
            p_start_date, v_today USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The bound a payment's startDate has (workers/rules/metadata.py, latest_start); same
    -- sentence.
    IF p_start_date > kc_latest_start(v_today) THEN
        RAISE EXCEPTION 'start date % is more than a year ahead; the latest start accepted '
                        'today is %', p_start_date, kc_latest_start(v_today)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_start := coalesce(p_start_date, v_purchase.start_date);
    IF kc_slot_end(v_slot, v_purchase.session_duration_minutes) IS NULL THEN
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
