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

-- Whether a session may be at that time at all (issue 24's moves and substitutes, 0018), with
-- "ends by midnight" asked of kc_slot_end instead of spelled out again.
CREATE OR REPLACE FUNCTION kc_time_refusal(p_date date, p_start time, p_minutes integer)
RETURNS text
LANGUAGE sql
STABLE
SET search_path = public, pg_temp
AS $$
    SELECT CASE
        WHEN kc_slot_end(p_start, p_minutes) IS NULL THEN
            format('ends_after_midnight: a %s-minute session at %s would end after midnight',
                   p_minutes, kc_clock(p_start))
        WHEN h.day IS NOT NULL THEN
            format('holiday: %s is a holiday (%s)', kc_long_date(p_date), h.reason)
    END
    FROM (SELECT 1) one
    LEFT JOIN holidays h ON h.day = p_date
$$;

-------------------------------------------------------------------------------------------------
-- One readable schema: a comment on every object of the project
-------------------------------------------------------------------------------------------------
-- sql/schema.sql (make schema) writes each object's comment above its current definition, so
-- a newcomer reads a table, view or function once, with what it is for and which rule it
-- holds. Every table, view, function and trigger of the project has one (tests/test_schema.py
-- names any that has not); columns have one where the name does not say it all. pgqueuer's own
-- objects are its business and alembic_version alembic's: none here. A later migration that
-- adds or redefines an object writes its comment beside it (CREATE OR REPLACE keeps a
-- function's comment; DROP and CREATE loses it).

-- Tables
COMMENT ON TABLE allocation_requests IS
    'An admin''s assignment of a trainer to a purchase: the allocation stage carries it out '
    'with the same rules (all but the ones an override sets aside) and closes it with the '
    'outcome. Kept forever as the record of who asked for what.';
COMMENT ON TABLE business_event_consumers IS
    'Each registered reader of the business events and the last position it has handled; an '
    'event is pruned only once every consumer has passed it.';
COMMENT ON TABLE business_event_positions IS
    'Each committed business event''s place in the feed, in commit order (kc_sequence_events); '
    'consumers read by position, never by seq.';
COMMENT ON TABLE business_event_sequencer IS
    'One row: the snapshot of the sequencer''s last run and the last position it gave, so each '
    'run numbers exactly the events committed since.';
COMMENT ON TABLE business_events IS
    'The outbox of business events for the app (docs/events.md): written by the triggers in the'
    ' transaction of each change, append-only, relayed to Redis; pruned by '
    'prune_business_events.';
COMMENT ON TABLE console_operators IS
    'The people who may sign in to the operations console: a name and the hash of their token; '
    'revoked operators stay as the record.';
COMMENT ON TABLE console_sessions IS
    'Console sign-ins: the hash of the session id kept in the browser''s cookie, whose operator'
    ' it is and until when (12 hours).';
COMMENT ON TABLE courses IS
    'The courses students buy; a trainer teaches a course when one of their specialties is its '
    'category or subcategory.';
COMMENT ON TABLE holidays IS
    'Days on which no session is scheduled: a schedule skips them and runs longer, keeping its '
    'count.';
COMMENT ON TABLE job_starts IS
    'Every start of a pipeline job, counted before the stage runs and committed on its own, so '
    'an attempt cut short by a crash still counts (pgqueuer re-picks such a job without '
    'counting).';
COMMENT ON TABLE kc_acting IS
    'Who the operator function running in a backend acts for; a row lives only inside that '
    'function''s transaction (kc_begin_acting, kc_end_acting) and is the only source of '
    'stage_history.actor.';
COMMENT ON TABLE payment_rejections IS
    'A succeeded payment whose metadata cannot make a purchase, with every problem found. Kept '
    'and replayable: fix payments.metadata (the payments trigger retries) or '
    'replay_stage(''purchase'', id).';
COMMENT ON TABLE payments IS
    'Payments as the payment service writes them: the pipeline''s input. A payment that becomes'
    ' succeeded starts the pipeline; one that becomes refunded ends its purchase.';
COMMENT ON TABLE purchase_upgrades IS
    'An upgrade payment that raised an existing purchase''s tier: one row per upgrade payment '
    'keeps the purchase stage idempotent for it (the purchase keeps its first payment_id).';
COMMENT ON TABLE schedule_changes IS
    'reschedule() requests: the purchase''s slot, start date or mode before and after. The '
    'allocation stage re-plans the future sessions and closes the request; kept as the record '
    'of who asked for what.';
COMMENT ON TABLE stage_followups IS
    'An enqueue that arrived while the row''s job was already running: when that job leaves '
    'pgqueuer''s table, trg_pgqueuer_followups enqueues the stage again, so the change is not '
    'lost.';
COMMENT ON TABLE stage_history IS
    'What happened to each row at each stage (pgqueuer deletes a job when it succeeds); kept '
    'until prune_history''s retention.';
COMMENT ON TABLE student_course_purchases IS
    'A student''s course: the plan the purchase stage made from a payment''s metadata, one per '
    'payment. Output of the purchase stage, input of the allocation stage.';
COMMENT ON TABLE students IS
    'The students, with their home (for trainers'' service radius and travel) and their IANA '
    'time zone (for the local schedule).';
COMMENT ON TABLE trainer_allocations IS
    'A purchase''s trainer (approved) or why it has none yet (pending, with the matching rule '
    'that stopped it); cancelled or completed when it ends. One live allocation per purchase.';
COMMENT ON TABLE trainer_availability IS
    'When a trainer can teach: per ISO weekday (1 Monday .. 7 Sunday), a slot in local time; a '
    'trainer is available for a schedule when a slot covers it on every weekday.';
COMMENT ON TABLE trainers IS
    'The trainers: what they teach, where they are based, how far they travel, their rating '
    '(which sets their capacity: kc_trainer_capacity).';
COMMENT ON TABLE tutoring_sessions IS
    'The sessions of an allocation, numbered from 1 per purchase; no two scheduled sessions of '
    'a trainer overlap (tutoring_sessions_no_trainer_overlap).';

-- Columns whose meaning the name does not tell
COMMENT ON COLUMN allocation_requests.override IS
    'Set aside the rules an admin may override (specialty, gender, range; '
    'workers/stages/allocation.py OVERRIDABLE); never activity or capacity.';
COMMENT ON COLUMN allocation_requests.requested_by IS
    'Who asked: set by assign_trainer (a console operator as ''console:<name>''), never by a '
    'writer of the table (trg_requested_by_guard).';
COMMENT ON COLUMN allocation_requests.status IS
    'open until the allocation stage decides it: done, refused (the trainer fails a rule that '
    'was not overridden) or superseded (a later request for the same purchase).';
COMMENT ON COLUMN allocation_requests.outcome IS
    'What the allocation stage did with the request, in a sentence.';
COMMENT ON COLUMN business_event_sequencer.snapshot IS
    'The transactions in flight at the last run: their events are numbered once they commit.';
COMMENT ON COLUMN business_events.event_id IS
    'Stable for the same change (kc_event_id of the event''s key): a change written twice is '
    'stored once.';
COMMENT ON COLUMN business_events.seq IS
    'Insertion order; not commit order, so consumers read business_event_positions instead.';
COMMENT ON COLUMN business_events.xid IS
    'The writing transaction, for the sequencer to know when it has committed.';
COMMENT ON COLUMN business_events.payload IS
    'The event exactly as the app reads it (type, eventId, timestamp, userId, role, metadata '
    'and its fields).';
COMMENT ON COLUMN console_operators.token_hash IS
    'SHA-256 of the operator''s token; the token itself is never stored.';
COMMENT ON COLUMN console_sessions.id_hash IS
    'SHA-256 of the session id; the id itself is only in the browser.';
COMMENT ON COLUMN console_sessions.client IS
    'The browser''s address and agent at sign-in, for the record.';
COMMENT ON COLUMN payment_rejections.errors IS
    'Every problem found in one pass: a list of {field, message}.';
COMMENT ON COLUMN payment_rejections.rejections IS
    'How many times this payment was tried and refused.';
COMMENT ON COLUMN payment_rejections.resolved_at IS
    'When a later try made the purchase.';
COMMENT ON COLUMN payments.metadata IS
    'The app''s payment form (session count, slot, start date, mode ...); read by '
    'workers/rules/metadata.py, names and rules in docs/payment-metadata.md.';
COMMENT ON COLUMN payments.status IS
    'initiated, succeeded, failed or refunded: succeeded starts the pipeline '
    '(payments_enqueue_purchase), refunded ends the purchase (payments_refunded).';
COMMENT ON COLUMN purchase_upgrades.reverted_at IS
    'When the upgrade payment was refunded and the tier went back.';
COMMENT ON COLUMN schedule_changes.requested_by IS
    'Who asked: set by reschedule (a console operator as ''console:<name>''), never by a writer'
    ' of the table (trg_requested_by_guard).';
COMMENT ON COLUMN schedule_changes.status IS
    'open until the allocation stage has re-planned the sessions, then done.';
COMMENT ON COLUMN stage_history.ref_id IS
    'The row the stage works on: a payment (purchase), a purchase (allocation) or an allocation'
    ' (sessions).';
COMMENT ON COLUMN stage_history.event IS
    'What happened: enqueued, succeeded, skipped, rejected, failed, replayed, healed, or the '
    'cause of an enqueue (refunded, completed, trainer_changed, rescheduled, makeup, '
    'assign_requested).';
COMMENT ON COLUMN stage_history.actor IS
    'The operator a replay or request acted for; set only by trg_stage_history_actor from '
    'kc_acting, never by the writer.';
COMMENT ON COLUMN student_course_purchases.purchase_tier IS
    'Sessions owed: 10, 20 or 30 (hybrid courses exactly 30); an upgrade raises it.';
COMMENT ON COLUMN student_course_purchases.preferred_time_slot IS
    'The wall-clock start of every session in the student''s zone; the session ends by midnight'
    ' (kc_slot_end).';
COMMENT ON COLUMN student_course_purchases.schedule_mode IS
    'daily, weekdays or sunday_only (kc_mode_weekdays; the words a payment may use: '
    'kc_mode_of).';
COMMENT ON COLUMN student_course_purchases.defaults_applied IS
    'The fields the metadata left out and the pipeline filled with a default, by name.';
COMMENT ON COLUMN student_course_purchases.is_active IS
    'false once refunded (deactivated_at) or finished (completed_at).';
COMMENT ON COLUMN student_course_purchases.learning_mode IS
    'home: every session at home; hybrid: 30 sessions, 1-6 online then alternating '
    '(kc_session_delivery).';
COMMENT ON COLUMN student_course_purchases.unused_metadata IS
    'The metadata keys the pipeline does not read, kept as sent.';
COMMENT ON COLUMN student_course_purchases.completed_at IS
    'When every owed session was delivered (complete_finished).';
COMMENT ON COLUMN students.timezone IS
    'An IANA zone name: session dates and times are wall-clock values in it.';
COMMENT ON COLUMN trainer_allocations.status IS
    'pending (no trainer fits yet), approved (live, counts toward capacity), cancelled or '
    'completed.';
COMMENT ON COLUMN trainer_allocations.reason IS
    'Why pending, or why it ended: a code of workers.rules.matching.Reason (the CHECK keeps '
    'them in step).';
COMMENT ON COLUMN trainer_allocations.metadata IS
    'The decision''s explanation: rules, eliminated counts, ranking, the chosen trainer, an '
    'admin''s assignment and how the allocation ended.';
COMMENT ON COLUMN trainer_allocations.attempts IS
    'How many times the allocation stage tried to find a trainer; the sweep waits longer after '
    'each (sweep_pending_allocations).';
COMMENT ON COLUMN trainer_allocations.capacity_override IS
    'An admin assignment that may exceed the trainer''s capacity.';
COMMENT ON COLUMN trainers.rating IS
    '0 to 5; sets how many live allocations the trainer may hold (kc_trainer_capacity).';
COMMENT ON COLUMN trainers.specialties_norm IS
    'specialties lower-cased and trimmed (kc_lower_array), for matching a course''s category '
    'and subcategory.';
COMMENT ON COLUMN trainers.service_radius_km IS
    'How far from the base the trainer travels to a student''s home.';
COMMENT ON COLUMN tutoring_sessions.scheduled_date IS
    'The day in the student''s zone.';
COMMENT ON COLUMN tutoring_sessions.scheduled_time IS
    'The wall-clock start in the student''s zone (a time in a DST gap moves forward by the '
    'gap).';
COMMENT ON COLUMN tutoring_sessions.starts_at IS
    'The exact instant the session starts.';
COMMENT ON COLUMN tutoring_sessions.status IS
    'scheduled, then completed or missed once started, or cancelled (and stays cancelled: '
    'trg_sessions_guard_status).';
COMMENT ON COLUMN tutoring_sessions.delivery IS
    'home or online, by the session''s number (kc_session_delivery).';

-- Views
COMMENT ON VIEW business_event_lag IS
    'Per consumer: its cursor, how many events and seconds it is behind, when it last moved '
    '(make doctor warns of one far behind).';
COMMENT ON VIEW course_progress IS
    'Per purchase: sessions by status, what is ahead, whether and when the course finished, and'
    ' the latest change of trainer or schedule.';
COMMENT ON VIEW failed_jobs IS
    'Failed jobs (held after their last attempt) with the error, the traceback and the row; '
    'replay_stage or replay_failed runs them again.';
COMMENT ON VIEW healed_rows IS
    'The rows heal_pipeline enqueued again, from the history.';
COMMENT ON VIEW live_jobs IS
    'The pipeline''s queued and running jobs, with the row each is for.';
COMMENT ON VIEW purchase_stages IS
    'Per purchase: where it is in the pipeline, stage by stage (the console''s and make '
    'trace''s overview).';
COMMENT ON VIEW purchase_trace IS
    'Everything that happened to one purchase, from its payment to its sessions, in order (make'
    ' trace).';
COMMENT ON VIEW rejected_payments IS
    'Payments refused by the purchase stage, with the problems and the metadata, for an '
    'operator to correct.';
COMMENT ON VIEW stage_jobs IS
    'Every pipeline job in pgqueuer''s table with its stage, row and status.';
COMMENT ON VIEW stage_last_error IS
    'The latest failure message of each (stage, row).';
COMMENT ON VIEW stage_last_event IS
    'The latest event of each (stage, row) from the history.';
COMMENT ON VIEW stage_overview IS
    'Per stage: queued, in flight, failed, oldest waiting age, and p50/p95 latency from the '
    'enqueue to the outcome over the last hour.';
COMMENT ON VIEW stuck IS
    'stuck_rows() with its defaults: rows whose next stage is missing.';
COMMENT ON VIEW unfit_allocations IS
    'Approved allocations whose trainer no longer meets the rules for what is still ahead (an '
    'admin override sets aside specialty, gender and range); the lifecycle ends them.';

-- Functions
COMMENT ON FUNCTION advance_event_consumer(text,bigint) IS
    'Moves a consumer''s cursor forward to the last position it handled (never back: two copies'
    ' of one consumer cannot undo each other''s progress); returns the cursor.';
COMMENT ON FUNCTION apply_refund(uuid) IS
    'Ends the purchase of a refunded payment (or reverts an upgrade): the allocation cancelled,'
    ' future sessions cancelled. Refuses a payment that is not refunded.';
COMMENT ON FUNCTION assign_trainer(uuid,uuid,boolean,text,text) IS
    'An operator''s request to give a purchase to a trainer (optionally overriding the rules an'
    ' admin may set aside), recorded in allocation_requests and carried out by the allocation '
    'stage.';
COMMENT ON FUNCTION complete_finished(interval,integer) IS
    'One bounded, idempotent pass of time passing: ended sessions become completed, allocations'
    ' with every owed session delivered complete, and their courses finish.';
COMMENT ON FUNCTION console_operator_add(text,text) IS
    'Adds a console operator, or gives a revoked one a new token; the token must look like one '
    'the CLI makes (no short or guessable token).';
COMMENT ON FUNCTION console_operator_count() IS
    'How many operators may sign in (the console refuses to listen beyond loopback with none).';
COMMENT ON FUNCTION console_operator_revoke(text) IS
    'Revokes an operator: their token stops working and every session of theirs ends now; '
    'returns the sessions ended.';
COMMENT ON FUNCTION console_session(text) IS
    'The operator and expiry of a live console session (no row: not signed in); the console''s '
    'check on every request.';
COMMENT ON FUNCTION console_sign_in(text,text,text) IS
    'Signs in with an operator''s token: records a session whose id the console made and keeps '
    'in the browser; no row when the token is no live operator''s.';
COMMENT ON FUNCTION console_sign_out(text) IS
    'Ends a console session; false when it was not live.';
COMMENT ON FUNCTION consumer_events(text,integer) IS
    'The events after a registered consumer''s cursor (the cursor does not move: '
    'advance_event_consumer).';
COMMENT ON FUNCTION drop_event_consumer(text) IS
    'An operator forgets a consumer (one that is gone holds back the pruning of events).';
COMMENT ON FUNCTION emit_session_rescheduled(uuid,date,time without time zone) IS
    'For a change that moves a session: SESSION_RESCHEDULED and the student''s notification, '
    'given where the session was; returns the event''s id.';
COMMENT ON FUNCTION emit_session_substituted(uuid,uuid) IS
    'For a change that gives a session to a substitute trainer: SESSION_SUBSTITUTED and the '
    'student''s notification; returns the event''s id.';
COMMENT ON FUNCTION end_allocation(uuid,text,text) IS
    'Ends a live allocation with a reason: cancelled, its future sessions cancelled (started '
    'ones stay); returns how many sessions were cancelled.';
COMMENT ON FUNCTION enqueue_stage(text,uuid,text,interval) IS
    'The only way to enqueue a stage for a row, in the transaction of the change that causes '
    'it: one live job per (stage, row), its priority from kc_job_priority; a job already '
    'running gets a follow-up (stage_followups).';
COMMENT ON FUNCTION events_after(bigint,integer) IS
    'Business events after a position, in commit order (the committed ones, numbered first); '
    'for a reader that keeps its own position.';
COMMENT ON FUNCTION heal_pipeline(interval) IS
    'The healer: rows older than p_min_age whose next stage has no job (a lost enqueue) are '
    'enqueued again and recorded as healed.';
COMMENT ON FUNCTION kc_allocation_events(uuid[],text[]) IS
    'The business events of allocations that changed (trainer allocated, student deallocated, '
    'admin override, notifications), from the rows and their statuses before.';
COMMENT ON FUNCTION kc_apply_refund_unchecked(uuid) IS
    'apply_refund''s work, without the check that the payment is refunded (for callers that '
    'have checked).';
COMMENT ON FUNCTION kc_assign_trainer(uuid,uuid,boolean,text) IS
    'assign_trainer''s work: checks the purchase and trainer, supersedes open requests, records'
    ' the request and enqueues the allocation stage.';
COMMENT ON FUNCTION kc_begin_acting(text) IS
    'Records who the running operator function acts for (kc_acting) and sets kc.acting = ''on'''
    ' until kc_end_acting.';
COMMENT ON FUNCTION kc_check_consumer(text) IS
    'Refuses a business event consumer''s name that is not 1 to 63 of a-z, 0-9, _ . : -.';
COMMENT ON FUNCTION kc_check_trainers(uuid[]) IS
    'For trainers who changed or lost availability: enqueues the allocation stage for each live'
    ' allocation they can no longer teach (unfit_allocations).';
COMMENT ON FUNCTION kc_clock(time without time zone) IS
    'A time of day as the app writes a time slot: 5:00 PM.';
COMMENT ON FUNCTION kc_console_operator(text) IS
    'The operator a live console session belongs to (no row: unknown, signed out, expired, or '
    'revoked).';
COMMENT ON FUNCTION kc_end_acting() IS
    'Ends kc_begin_acting: forgets the actor and puts kc.acting back.';
COMMENT ON FUNCTION kc_enqueue_allocation(uuid,text,text) IS
    'Enqueues the allocation stage for a purchase and records why in stage_history first.';
COMMENT ON FUNCTION kc_epoch_ms(timestamp with time zone) IS
    'Milliseconds since the epoch (the app''s timestamp).';
COMMENT ON FUNCTION kc_event(text,text,timestamp with time zone,text,text,jsonb,jsonb) IS
    'The common shape of a business event (type, eventId from its key, timestamp, userId, role,'
    ' metadata) with the type''s own fields.';
COMMENT ON FUNCTION kc_event_admin_override(uuid,text,text,jsonb,text,jsonb,timestamp with time zone) IS
    'Builds ADMIN_OVERRIDE: an admin''s assignment of a trainer, with what changed and why.';
COMMENT ON FUNCTION kc_event_course_access_granted(uuid,uuid,uuid,integer,jsonb,timestamp with time zone) IS
    'Builds COURSE_ACCESS_GRANTED for a new purchase.';
COMMENT ON FUNCTION kc_event_course_completed(uuid,uuid,uuid,date,integer,integer,jsonb,timestamp with time zone) IS
    'Builds COURSE_COMPLETED: every owed session delivered.';
COMMENT ON FUNCTION kc_event_course_progress_updated(uuid,uuid,uuid,integer,integer,timestamp with time zone,jsonb,timestamp with time zone) IS
    'Builds COURSE_PROGRESS_UPDATED: sessions delivered of those owed.';
COMMENT ON FUNCTION kc_event_id(text) IS
    'A stable UUID (version 8) from the SHA-256 of an event''s key: the same change always gets'
    ' the same id.';
COMMENT ON FUNCTION kc_event_notification(text,uuid,text,text,text,text,jsonb,jsonb,timestamp with time zone) IS
    'Builds a NOTIFICATION for the student or trainer; p_key names what it is about, so one '
    'change never notifies twice.';
COMMENT ON FUNCTION kc_event_purchase_created(uuid,uuid,uuid,integer,jsonb,timestamp with time zone) IS
    'Builds PURCHASE_CREATED with the payment''s metadata as the app sent it.';
COMMENT ON FUNCTION kc_event_session_completed(uuid,uuid,uuid,uuid,timestamp with time zone,integer,jsonb,timestamp with time zone) IS
    'Builds SESSION_COMPLETED.';
COMMENT ON FUNCTION kc_event_session_rescheduled(uuid,date,date,time without time zone,time without time zone,uuid,uuid,jsonb,timestamp with time zone) IS
    'Builds SESSION_RESCHEDULED: a session''s old and new date and time.';
COMMENT ON FUNCTION kc_event_session_substituted(uuid,uuid,uuid,uuid,date,time without time zone,jsonb,timestamp with time zone) IS
    'Builds SESSION_SUBSTITUTED: a session given to another trainer.';
COMMENT ON FUNCTION kc_event_sessions_generated(uuid,uuid,uuid,uuid,uuid[],date,jsonb,timestamp with time zone) IS
    'Builds SESSIONS_GENERATED: the sessions an allocation got in one statement.';
COMMENT ON FUNCTION kc_event_student_deallocated(uuid,uuid,uuid,uuid,text,timestamp with time zone,jsonb,timestamp with time zone) IS
    'Builds STUDENT_DEALLOCATED: an allocation ended, with the reason.';
COMMENT ON FUNCTION kc_event_trainer_allocated(uuid,uuid,uuid,uuid,integer,date,date,jsonb,timestamp with time zone) IS
    'Builds TRAINER_ALLOCATED: a purchase''s trainer approved.';
COMMENT ON FUNCTION kc_haversine_km(double precision,double precision,double precision,double precision) IS
    'Great-circle distance in km between two points: the one home of distance (service radius, '
    'travel between sessions); no Python copy.';
COMMENT ON FUNCTION kc_iso(timestamp with time zone) IS
    'An instant as JavaScript''s toISOString() writes it: 2026-11-23T11:30:00.000Z.';
COMMENT ON FUNCTION kc_job_priority(text,uuid,text) IS
    'A job''s priority for its stage and row: later stages first; a purchase that waits for a '
    'trainer and is tried again last.';
COMMENT ON FUNCTION kc_job_ref(text,text) IS
    'The row of one of the pipeline''s jobs (''<stage>:<uuid>''), NULL for anything else in '
    'pgqueuer''s table (another application''s job must not break the views or the healer).';
COMMENT ON FUNCTION kc_latest_start(date) IS
    'The latest start date accepted on a day: a year ahead, 28 February for 29 February, at '
    'most 9999-12-31. The SQL half of metadata.latest_start (tests/test_rule_pairs.py).';
COMMENT ON FUNCTION kc_limit_database_access() IS
    'Closes the database to every login but the project''s roles (PUBLIC keeps CONNECT and '
    'TEMPORARY on a new database); run by the migrations and on each test copy.';
COMMENT ON FUNCTION kc_lock_trainer(uuid) IS
    'The transaction-scoped lock of one trainer: approvals for a trainer are serialised without'
    ' a row lock (the allocation stage and the capacity trigger take it).';
COMMENT ON FUNCTION kc_long_date(date) IS
    'A day as the app''s notifications write it: Monday, November 23, 2026.';
COMMENT ON FUNCTION kc_lower_array(text[]) IS
    'A lower-cased, trimmed copy of a text array: specialties match case-insensitively.';
COMMENT ON FUNCTION kc_mode_of(text) IS
    'The schedule mode a word names (daily, weekdays, sunday_only), NULL for any other text: '
    'the SQL half of metadata.MODE_WORDS, ASCII only (tests/test_rule_pairs.py).';
COMMENT ON FUNCTION kc_mode_weekdays(text) IS
    'The ISO weekdays a schedule mode uses: the SQL half of schedule.allowed_weekdays '
    '(tests/test_rule_pairs.py).';
COMMENT ON FUNCTION kc_operator_actor(text) IS
    'Who an operator function acts for: the console session''s operator, checked '
    '(''console:<name>''); without a session the database login.';
COMMENT ON FUNCTION kc_parse_clock(text) IS
    'A clock time as the app writes it (''4:00 PM'', ''4 PM'', ''16:00''), or '
    'invalid_datetime_format with the reason: the SQL half of metadata.parse_clock '
    '(tests/test_rule_pairs.py).';
COMMENT ON FUNCTION kc_purchase_events(uuid[]) IS
    'The business events of new purchases: PURCHASE_CREATED and COURSE_ACCESS_GRANTED.';
COMMENT ON FUNCTION kc_replay_stage(text,uuid) IS
    'replay_stage''s work: checks the stage and row, removes a failed job and enqueues the '
    'stage again.';
COMMENT ON FUNCTION kc_require_refunded(uuid) IS
    'Refuses (invalid_parameter_value) a payment that is not refunded: apply_refund''s check.';
COMMENT ON FUNCTION kc_reschedule(uuid,text,date,text) IS
    'reschedule''s work: checks the purchase and the new slot (kc_parse_clock, ends by '
    'midnight: kc_slot_end), mode (kc_mode_of) and start (not past, kc_latest_start), changes '
    'the purchase, records the request and enqueues the allocation stage.';
COMMENT ON FUNCTION kc_retry_pending(uuid[]) IS
    'Enqueues once, in purchase order, every waiting purchase one of these trainers could teach'
    ' (NULL: every waiting purchase); returns how many.';
COMMENT ON FUNCTION kc_sequence_events() IS
    'Numbers the business events committed since its last run, in commit order '
    '(business_event_positions), one run at a time.';
COMMENT ON FUNCTION kc_session_delivery(text,integer) IS
    'Where session number n of a course happens (home, or hybrid: 1-6 online then alternating):'
    ' the SQL half of schedule.delivery_for (tests/test_rule_pairs.py).';
COMMENT ON FUNCTION kc_sessions_events(uuid[]) IS
    'The business events of new sessions: SESSIONS_GENERATED per allocation and the student''s '
    'notification.';
COMMENT ON FUNCTION kc_slot_end(time without time zone,integer) IS
    'When a session starting at a time ends: 24:00 at midnight exactly, NULL past midnight. The'
    ' one SQL home of "ends by midnight", the SQL half of schedule.slot_end '
    '(tests/test_rule_pairs.py).';
COMMENT ON FUNCTION kc_store_events(uuid[],jsonb[]) IS
    'Writes built business events in order (a change written twice is stored once) and wakes '
    'the relay at commit; returns how many were new.';
COMMENT ON FUNCTION kc_trainer_capacity(numeric) IS
    'How many live allocations a trainer may hold, by rating (4 to 8): the SQL half of '
    'matching.capacity_for (tests/test_rule_pairs.py).';
COMMENT ON FUNCTION kc_try_lock_trainer(uuid) IS
    'kc_lock_trainer without waiting: false when another transaction holds the trainer (a batch'
    ' tries the next trainer instead of waiting in a circle).';
COMMENT ON FUNCTION prune_business_events(interval) IS
    'Retention: deletes business events older than p_keep that every consumer has passed.';
COMMENT ON FUNCTION prune_history(interval) IS
    'Retention: deletes stage history, pgqueuer''s log and job starts older than p_keep (at '
    'least a day).';
COMMENT ON FUNCTION record_job_start(bigint,text,uuid,uuid) IS
    'Counts a start of a job (job_starts), committed before the stage runs; returns the count.';
COMMENT ON FUNCTION register_event_consumer(text,boolean) IS
    'Registers a business event consumer with a cursor kept here, from the next event on or '
    'from the oldest kept; returns its position.';
COMMENT ON FUNCTION replay_failed(text,text) IS
    'An operator replays every failed job of a stage; returns how many.';
COMMENT ON FUNCTION replay_stage(text,uuid,text) IS
    'An operator runs a stage for a row again (a failed job, a rejected payment after its '
    'metadata was fixed); recorded with the operator as actor.';
COMMENT ON FUNCTION reschedule(uuid,text,date,text,text) IS
    'An operator moves a purchase''s future sessions to another slot, start date or mode '
    '(kc_reschedule), recorded with the operator as actor.';
COMMENT ON FUNCTION retry_pending_allocations(uuid) IS
    'An operator asks the allocation stage to try waiting purchases again (those one trainer '
    'could teach, or all).';
COMMENT ON FUNCTION stuck_rows(interval) IS
    'Rows older than p_older_than whose next stage is missing, with what is holding them.';
COMMENT ON FUNCTION sweep_lifecycle(integer) IS
    'The safety net for enqueues a running job absorbed: unfit live allocations and reschedule '
    'requests open too long are enqueued again.';
COMMENT ON FUNCTION sweep_pending_allocations(interval,integer) IS
    'Enqueues the allocation stage for pending allocations, each waiting longer after every '
    'attempt (doubling, at most a day).';
COMMENT ON FUNCTION trg_allocations_check_capacity() IS
    'The last line of defence for capacity: an approved allocation beyond the trainer''s '
    'capacity (kc_trainer_capacity) is refused unless capacity_override.';
COMMENT ON FUNCTION trg_allocations_enqueue_sessions() IS
    'An allocation that becomes approved (or changes trainer) enqueues the sessions stage.';
COMMENT ON FUNCTION trg_allocations_retry_pending() IS
    'Allocations that ended free their trainers'' capacity: waiting purchases those trainers '
    'could teach are tried again.';
COMMENT ON FUNCTION trg_availability_check_live_allocations() IS
    'Availability removed or narrowed: the trainers'' live allocations are checked '
    '(kc_check_trainers).';
COMMENT ON FUNCTION trg_availability_retry_pending() IS
    'Availability added or changed: waiting purchases the trainers could teach are tried again.';
COMMENT ON FUNCTION trg_events_allocations_inserted() IS
    'New allocations: their business events (kc_allocation_events).';
COMMENT ON FUNCTION trg_events_allocations_updated() IS
    'Allocations that changed: their business events (kc_allocation_events).';
COMMENT ON FUNCTION trg_events_purchases_inserted() IS
    'New purchases: their business events (kc_purchase_events).';
COMMENT ON FUNCTION trg_events_purchases_updated() IS
    'Courses that finished (completed_at set): COURSE_COMPLETED and the student''s '
    'congratulations.';
COMMENT ON FUNCTION trg_events_sessions_inserted() IS
    'New sessions: their business events (kc_sessions_events).';
COMMENT ON FUNCTION trg_events_sessions_updated() IS
    'Sessions that changed status: SESSION_COMPLETED, COURSE_PROGRESS_UPDATED and the '
    'student''s notifications.';
COMMENT ON FUNCTION trg_payments_enqueue_purchase() IS
    'A payment that becomes succeeded (or whose metadata is corrected while it has no purchase)'
    ' enqueues the purchase stage.';
COMMENT ON FUNCTION trg_payments_refunded() IS
    'A payment that becomes refunded ends its purchase (apply_refund).';
COMMENT ON FUNCTION trg_payments_touch() IS
    'Keeps payments.updated_at current.';
COMMENT ON FUNCTION trg_pgqueuer_followups() IS
    'When a job leaves pgqueuer''s table, the follow-ups asked while it ran (stage_followups) '
    'are enqueued.';
COMMENT ON FUNCTION trg_purchases_enqueue_allocation() IS
    'A new purchase enqueues the allocation stage.';
COMMENT ON FUNCTION trg_purchases_tier_raised() IS
    'A raised tier (an upgrade) enqueues the allocation stage for the extra sessions.';
COMMENT ON FUNCTION trg_requested_by_guard() IS
    'requested_by of a request is set by the operator function that records it, never by a '
    'writer of the table.';
COMMENT ON FUNCTION trg_sessions_check_delivery() IS
    'The last line of defence for the hybrid split: a session''s delivery follows its number '
    '(kc_session_delivery).';
COMMENT ON FUNCTION trg_sessions_check_delivery_inserted() IS
    'The hybrid split for inserted sessions, once per statement over its new rows.';
COMMENT ON FUNCTION trg_sessions_guard_status() IS
    'A session''s status moves forward only: cancelled stays cancelled, nothing becomes '
    'scheduled again, completed or missed only once started.';
COMMENT ON FUNCTION trg_sessions_makeup() IS
    'A session cancelled while its allocation is live leaves the purchase short: the allocation'
    ' stage appends a make-up.';
COMMENT ON FUNCTION trg_sessions_retry_pending() IS
    'Sessions cancelled free their time: waiting purchases are tried again.';
COMMENT ON FUNCTION trg_stage_history_actor() IS
    'Sets stage_history.actor from kc_acting, whatever the writer gave.';
COMMENT ON FUNCTION trg_trainers_check_live_allocations() IS
    'A trainer who changed (status, specialties, gender, radius, base): their live allocations '
    'are checked (kc_check_trainers).';
COMMENT ON FUNCTION trg_trainers_retry_pending() IS
    'Trainers added or changed while active: waiting purchases they could teach are tried '
    'again.';

-- Triggers
COMMENT ON TRIGGER allocation_requests_requested_by ON allocation_requests IS
    'requested_by is the operator function''s to set (trg_requested_by_guard).';
COMMENT ON TRIGGER payments_enqueue_purchase ON payments IS
    'A succeeded payment starts the pipeline (trg_payments_enqueue_purchase).';
COMMENT ON TRIGGER payments_refunded ON payments IS
    'A refunded payment ends its purchase (trg_payments_refunded).';
COMMENT ON TRIGGER payments_touch ON payments IS
    'Keeps updated_at current (trg_payments_touch).';
COMMENT ON TRIGGER pgqueuer_followups ON pgqueuer IS
    'The project''s trigger on pgqueuer''s table: follow-ups of finished jobs '
    '(trg_pgqueuer_followups).';
COMMENT ON TRIGGER schedule_changes_requested_by ON schedule_changes IS
    'requested_by is the operator function''s to set (trg_requested_by_guard).';
COMMENT ON TRIGGER stage_history_actor ON stage_history IS
    'The actor comes from kc_acting only (trg_stage_history_actor).';
COMMENT ON TRIGGER student_course_purchases_enqueue_allocation ON student_course_purchases IS
    'A new purchase goes to the allocation stage (trg_purchases_enqueue_allocation).';
COMMENT ON TRIGGER student_course_purchases_events_inserted ON student_course_purchases IS
    'Business events of new purchases (trg_events_purchases_inserted).';
COMMENT ON TRIGGER student_course_purchases_events_updated ON student_course_purchases IS
    'Business events of finished courses (trg_events_purchases_updated).';
COMMENT ON TRIGGER student_course_purchases_tier_raised ON student_course_purchases IS
    'An upgrade asks for the extra sessions (trg_purchases_tier_raised).';
COMMENT ON TRIGGER trainer_allocations_check_capacity ON trainer_allocations IS
    'Capacity, the last line of defence (trg_allocations_check_capacity).';
COMMENT ON TRIGGER trainer_allocations_enqueue_sessions ON trainer_allocations IS
    'An approved allocation goes to the sessions stage (trg_allocations_enqueue_sessions).';
COMMENT ON TRIGGER trainer_allocations_events_inserted ON trainer_allocations IS
    'Business events of new allocations (trg_events_allocations_inserted).';
COMMENT ON TRIGGER trainer_allocations_events_updated ON trainer_allocations IS
    'Business events of changed allocations (trg_events_allocations_updated).';
COMMENT ON TRIGGER trainer_allocations_retry_pending ON trainer_allocations IS
    'Ended allocations free capacity for waiting purchases (trg_allocations_retry_pending).';
COMMENT ON TRIGGER trainer_availability_added_retry_pending ON trainer_availability IS
    'New availability: waiting purchases tried again (trg_availability_retry_pending).';
COMMENT ON TRIGGER trainer_availability_changed_retry_pending ON trainer_availability IS
    'Changed availability: waiting purchases tried again (trg_availability_retry_pending).';
COMMENT ON TRIGGER trainer_availability_narrowed ON trainer_availability IS
    'Narrowed availability: live allocations checked (trg_availability_check_live_allocations).';
COMMENT ON TRIGGER trainer_availability_removed ON trainer_availability IS
    'Removed availability: live allocations checked (trg_availability_check_live_allocations).';
COMMENT ON TRIGGER trainers_added_retry_pending ON trainers IS
    'New trainers: waiting purchases tried again (trg_trainers_retry_pending).';
COMMENT ON TRIGGER trainers_changed_retry_pending ON trainers IS
    'Changed trainers: waiting purchases tried again (trg_trainers_retry_pending).';
COMMENT ON TRIGGER trainers_check_live_allocations ON trainers IS
    'Changed trainers: live allocations checked (trg_trainers_check_live_allocations).';
COMMENT ON TRIGGER tutoring_sessions_check_delivery ON tutoring_sessions IS
    'The hybrid split on update (trg_sessions_check_delivery).';
COMMENT ON TRIGGER tutoring_sessions_check_delivery_inserted ON tutoring_sessions IS
    'The hybrid split on insert (trg_sessions_check_delivery_inserted).';
COMMENT ON TRIGGER tutoring_sessions_events_inserted ON tutoring_sessions IS
    'Business events of new sessions (trg_events_sessions_inserted).';
COMMENT ON TRIGGER tutoring_sessions_events_updated ON tutoring_sessions IS
    'Business events of changed sessions (trg_events_sessions_updated).';
COMMENT ON TRIGGER tutoring_sessions_guard_status ON tutoring_sessions IS
    'A session''s status moves forward only (trg_sessions_guard_status).';
COMMENT ON TRIGGER tutoring_sessions_makeup ON tutoring_sessions IS
    'Cancelled sessions of a live allocation get make-ups (trg_sessions_makeup).';
COMMENT ON TRIGGER tutoring_sessions_retry_pending ON tutoring_sessions IS
    'Cancelled sessions free time for waiting purchases (trg_sessions_retry_pending).';

-- Issue 24's and 25's objects (migrations 0018-0020), which came after this migration was
-- written: their comments here, beside the others.
COMMENT ON TABLE kc_settings IS
    'One typed row of the values the moves'' rules read (cut-off, auto-approval, the distance between neighbouring sessions): the app and operators call the move functions straight in SQL, with no worker environment in between. The owner changes them.';
COMMENT ON TABLE trainer_reschedules IS
    'Requests to move one session (the app''s field names): who asked (student, trainer, operator), from when to when and why; pending -> approved | rejected | cancelled, with who reviewed it and when. One pending request per session (partial unique index).';
COMMENT ON TABLE trainer_leaves IS
    'A trainer''s days away (first_day..last_day, the students'' local dates): requested, approved or cancelled, with who did each and when. No two leaves of one trainer that are not cancelled overlap (exclusion constraint).';
COMMENT ON VIEW trainer_session_substitutions IS
    'The old app''s table by its field names: one row per session a substitute now teaches (session_date, original and substitute trainer, student, the leave).';

COMMENT ON FUNCTION kc_time_refusal(date, time, integer) IS
    'Whether a session of that length may be at that local date and time at all, whoever teaches it: NULL, or ''<code>: <why>'' (ends after midnight, by kc_slot_end; a holiday).';
COMMENT ON FUNCTION kc_session_fit(uuid, uuid, date, time, boolean) IS
    'May this trainer take this one session at that local date and start? NULL, or ''<code>: <sentence>'' of the first rule failed: on leave that day first, then kc_session_fit_rules. Shared by moves, substitutes and leave.';
COMMENT ON FUNCTION kc_session_fit_rules(uuid, uuid, date, time, boolean) IS
    'The matching rules for one session (0018''s kc_session_fit): the time itself, the student free, with p_full active, specialty, gender and range, always availability over the whole slot, no overlapping session, neighbours within reach. No capacity: one session is no allocation.';
COMMENT ON FUNCTION kc_best_substitute(uuid, date, time) IS
    'The best trainer other than the session''s own who fits that one session at that local date and time (kc_session_fit, p_full), ranked as the matching ranks; NULL when nobody does.';
COMMENT ON FUNCTION kc_substitute_fit(uuid, uuid, boolean) IS
    'kc_session_fit at the session''s own date and time.';
COMMENT ON FUNCTION kc_check_move(uuid, date, time) IS
    'What a move may not do, at the request and again at approval: the session scheduled and not started, its purchase live, the new time in the future beyond the cut-off, no holiday, ending by midnight. Raises with a sentence, or returns the session''s facts.';
COMMENT ON FUNCTION kc_place_session(uuid, date, time, uuid) IS
    'Puts a session at its new time (and trainer), then renumbers the standing sessions the move passed in time order, each with the delivery its number gives (a hybrid course keeps its pattern).';
COMMENT ON FUNCTION request_session_move(uuid, date, text, text, text, text, text) IS
    'The app or an operator asks to move one session: checked at once (kc_check_move), refused with a sentence changing nothing; carried out at once when kc_settings says so and the trainer fits, else pending.';
COMMENT ON FUNCTION approve_session_move(uuid, boolean, text) IS
    'An operator approves a pending move: carried out in one transaction under the rules for that session, or refused with the rule''s sentence; with p_substitute the best other trainer takes the session instead.';
COMMENT ON FUNCTION kc_approve_move(uuid, boolean, text) IS
    'approve_session_move''s work: locks in the allocation stage''s order (request, purchase, one trainer at a time), re-checks the move, places the session or raises with the rule.';
COMMENT ON FUNCTION reject_session_move(uuid, text, text) IS
    'An operator rejects a pending move, with the reason the requester reads.';
COMMENT ON FUNCTION cancel_session_move(uuid, text) IS
    'The requester (the app) or an operator withdraws a pending move.';
COMMENT ON FUNCTION trg_reschedules_approved() IS
    'An approved move tells the app in its transaction: SESSION_RESCHEDULED and the notifications, and with a substitute SESSION_SUBSTITUTED and the three trainers'' and student''s notifications.';
COMMENT ON FUNCTION kc_leave_today() IS
    'The first date of a leave still ahead somewhere (today where the day began last, UTC-12): a leave whose last day is before it has ended everywhere.';
COMMENT ON FUNCTION kc_session_history(uuid, text, text) IS
    'Writes the history line of one session''s change (ref: its purchase).';
COMMENT ON FUNCTION kc_trainer_label(uuid) IS
    'A trainer as the sentences name one: id and name.';
COMMENT ON FUNCTION kc_lock_substitutions() IS
    'One substituting transaction at a time: only substitutions hold one trainer''s lock while waiting for another''s, so they take turns and no cycle forms.';
COMMENT ON FUNCTION kc_lock_sessions(uuid[]) IS
    'Locks the purchases of these sessions in id order (the allocation stage''s first lock), then the sessions.';
COMMENT ON FUNCTION kc_lock_trainer_leaves(uuid) IS
    'Serialises the leave requests of one trainer (transaction advisory lock), so the overlap check and the insert are not raced.';
COMMENT ON FUNCTION kc_substitute_one(uuid, uuid, bigint) IS
    'Gives one locked session to a substitute (named, or the best who fits), each candidate re-checked under their lock; returns the substitute, or NULL with why nobody took it.';
COMMENT ON FUNCTION kc_substitute_session(uuid, uuid) IS
    'substitute_session''s work: a named trainer checked by every rule, or the best.';
COMMENT ON FUNCTION substitute_session(uuid, uuid, text) IS
    'An operator puts a substitute on one session without leave: the named trainer (refused with the rule''s sentence when unfit) or the best who fits.';
COMMENT ON FUNCTION request_leave(uuid, date, date, text, text) IS
    'The app (kc_app) or an operator records a trainer''s leave request: refused with a sentence when the days are wrong or overlap another leave.';
COMMENT ON FUNCTION kc_request_leave(uuid, date, date, text, text) IS
    'request_leave''s work, under the trainer''s leave lock.';
COMMENT ON FUNCTION approve_leave(bigint, integer, text) IS
    'An operator approves a leave: each scheduled session of the trainer in those days gets the best substitute who fits it, or is cancelled with its make-up; a leave longer than p_handover_days hands the courses over instead. One row per session changed.';
COMMENT ON FUNCTION kc_approve_leave(bigint, integer, text) IS
    'approve_leave''s work, in the substitutions'' lock order.';
COMMENT ON FUNCTION cancel_leave(bigint, text) IS
    'An operator cancels a leave: requested, it closes; approved, its future sessions go back to their trainer where still free (the others stay with their substitute). One row per session.';
COMMENT ON FUNCTION kc_cancel_leave(bigint, text) IS
    'cancel_leave''s work, in the substitutions'' lock order.';
COMMENT ON FUNCTION trg_sessions_substitute_columns() IS
    'Whoever changes a session''s trainer, the columns beside it follow: the first change records whose it was, back to that trainer clears them.';
COMMENT ON FUNCTION trg_events_sessions_substituted() IS
    'A scheduled session whose trainer changes at its own time tells the app: SESSION_SUBSTITUTED and the student''s and both trainers'' notifications.';
COMMENT ON FUNCTION kc_load_touch(uuid[]) IS
    'Remembers, transaction-locally (a rolled-back savepoint forgets), the trainers whose approved allocations a statement changed, for trainer_load to settle at commit.';
COMMENT ON FUNCTION kc_recount_trainer_load() IS
    'Sets every trainer''s live allocation count again from the allocations, after writes with triggers off (the benchmark''s seeding, a repair). The owner''s.';
COMMENT ON FUNCTION trg_allocations_load_touch() IS
    'Once per statement on trainer_allocations: the trainers it touched are remembered (kc_load_touch).';
COMMENT ON FUNCTION trg_allocations_load_settle() IS
    'At commit: settles trainer_load for every trainer the transaction touched, locked in id order, then recounted.';
COMMENT ON FUNCTION trg_trainers_load_row() IS
    'Every trainer has a trainer_load row from the start, so settling only updates.';

COMMENT ON TRIGGER trainer_reschedules_approved ON trainer_reschedules IS
    'The events of an approved move, in its transaction.';
COMMENT ON TRIGGER tutoring_sessions_substitute_columns ON tutoring_sessions IS
    'Records the original trainer beside a substituted session.';
COMMENT ON TRIGGER tutoring_sessions_events_substituted ON tutoring_sessions IS
    'The events of a session that changed trainer at its own time.';
COMMENT ON TRIGGER trainers_load_row ON trainers IS
    'A trainer_load row for every new trainer.';
COMMENT ON TRIGGER trainer_allocations_load_touch_inserted ON trainer_allocations IS
    'Remembers the trainers an INSERT touched (trainer_load).';
COMMENT ON TRIGGER trainer_allocations_load_touch_updated ON trainer_allocations IS
    'Remembers the trainers an UPDATE touched (trainer_load).';
COMMENT ON TRIGGER trainer_allocations_load_touch_deleted ON trainer_allocations IS
    'Remembers the trainers a DELETE touched (trainer_load).';
COMMENT ON TRIGGER trainer_allocations_load_settle_inserted ON trainer_allocations IS
    'Settles trainer_load at commit after an INSERT.';
COMMENT ON TRIGGER trainer_allocations_load_settle_updated ON trainer_allocations IS
    'Settles trainer_load at commit after an UPDATE.';
COMMENT ON TRIGGER trainer_allocations_load_settle_deleted ON trainer_allocations IS
    'Settles trainer_load at commit after a DELETE.';
