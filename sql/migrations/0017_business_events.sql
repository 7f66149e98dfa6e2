-- 0017 business events: what the app hears, written in the transaction of each change.
--
-- The app around the pipeline (kc-backend) learns of a decision only from JSON business
-- events on the Redis channel `business-events` (shared/events/types.ts gives their shapes).
-- Here every change to the output tables writes its events into `business_events` (the
-- outbox) from triggers, in the transaction of the change: a change that rolls back has no
-- event, a committed one always has its events, whoever made it (a stage, an operator
-- function, the completion job, the app marking a session). The relay (workers/events/relay.py)
-- and any SQL consumer read them in commit order through `events_after` / `consumer_events`.
-- docs/events.md describes every event, when it is written and how to consume it.
--
-- Ids. An event's id is derived from its type and what changed (kc_event_id): the same change
-- seen twice (a replayed stage writes nothing, so it fires nothing; two statements reporting
-- the same progress) gives the same id, and the outbox keeps one (ON CONFLICT DO NOTHING).
--
-- Order. `seq` numbers events as they are written, but a transaction that wrote seq 7 may
-- commit after one that wrote seq 8: a reader that followed seq alone would skip 7 for ever.
-- So events get their place in the feed (`business_event_positions.position`) once committed:
-- the sequencer (kc_sequence_events, run by every reader) takes the events that became
-- visible since its last run (by the writers' transaction ids against its last snapshot) and
-- numbers them in seq order after the last position. Positions follow commit order, and
-- within the events committed between two runs, seq order, which is the order in which any
-- two changes of one purchase happened (a later change waits for the earlier one's locks, so
-- it draws its numbers after the earlier one committed).
--
-- Privileges. Only the owner writes the outbox (the triggers run as the owner); kc_worker has
-- no right on it. Consumers (the role kc_events, of which kc_worker is a member: the relay runs
-- with the workers' login) read through the functions below and move their own cursor.

-- kc_events: a reader of the business events (the relay; the app's SQL consumers). Roles
-- belong to the cluster: created when missing, by the migrating user (not kc_owner).
RESET ROLE;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kc_events') THEN
        IF NOT (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user)
        THEN
            RAISE EXCEPTION 'role kc_events does not exist and % may not create roles',
                current_user
                USING HINT = 'as a superuser: CREATE ROLE kc_events NOLOGIN; '
                             'GRANT kc_events TO kc_worker;';
        END IF;
        CREATE ROLE kc_events NOLOGIN;
    END IF;
    IF NOT pg_has_role('kc_worker', 'kc_events', 'MEMBER') THEN
        GRANT kc_events TO kc_worker;
    END IF;
END
$$;
SET LOCAL ROLE kc_owner;

-- The outbox: append-only (nothing but prune_business_events deletes; nothing updates).
CREATE TABLE business_events (
    event_id    uuid PRIMARY KEY,
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    type        text NOT NULL CHECK (type IN (
                    'PURCHASE_CREATED', 'COURSE_ACCESS_GRANTED', 'TRAINER_ALLOCATED',
                    'SESSIONS_GENERATED', 'STUDENT_DEALLOCATED', 'SESSION_RESCHEDULED',
                    'SESSION_SUBSTITUTED', 'SESSION_COMPLETED', 'COURSE_PROGRESS_UPDATED',
                    'COURSE_COMPLETED', 'ADMIN_OVERRIDE', 'NOTIFICATION_REQUESTED')),
    purchase_id uuid,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    payload     jsonb NOT NULL CHECK (payload ->> 'type' = type
                                      AND (payload ->> 'eventId')::uuid = event_id)
);
COMMENT ON TABLE business_events IS
    'The outbox: the app''s business events, written by triggers in the transaction of each '
    'change (docs/events.md). Read in commit order through events_after/consumer_events.';
-- The sequencer finds what committed since its last run by transaction id.
CREATE INDEX business_events_xid_idx ON business_events (xid);
-- A purchase's events (the trace).
CREATE INDEX business_events_purchase_idx ON business_events (purchase_id);

-- Each committed event's place in the feed, in commit order (see above).
-- (No foreign key: its check would lock every event row it numbers; prune deletes both.)
CREATE TABLE business_event_positions (
    position bigint PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE
);

-- The sequencer's state: the snapshot of its last run and the last position it gave.
CREATE TABLE business_event_sequencer (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    snapshot      pg_snapshot NOT NULL,
    last_position bigint NOT NULL DEFAULT 0,
    sequenced_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO business_event_sequencer (snapshot) VALUES (pg_current_snapshot());

-- Per-consumer cursors: the last position a consumer has handled.
CREATE TABLE business_event_consumers (
    consumer      text PRIMARY KEY CHECK (consumer ~ '^[a-z0-9][a-z0-9_.:-]{0,62}$'),
    position      bigint NOT NULL CHECK (position >= 0),
    registered_at timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- == Formats ================================================================================

-- A UUID (version 8, RFC 9562) from the SHA-256 of an event's key: stable for the same change.
-- The version and the variant nibble are both 8 (120 bits of the hash remain). The hash is
-- named once, so that the planner inlines the function (it does not when an argument that
-- costs something is used twice). workers/events/shapes.py event_id() computes the same.
-- These helpers are STABLE (as convert_to, extract and to_char are) and not STRICT, so that
-- the planner inlines them into the triggers' statements: called as functions, each is
-- planned again in every trigger's statement and costs more than the event's insert.
CREATE FUNCTION kc_event_id(p_key text) RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT overlay(overlay(substr(encode(sha256(convert_to('koding-caravan:' || p_key, 'UTF8')),
                                           'hex'), 1, 32)
                             placing '8' from 13 for 1) placing '8' from 17 for 1)::uuid $$;

-- Milliseconds since the epoch (the app's `timestamp`).
CREATE FUNCTION kc_epoch_ms(p_at timestamptz) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT floor(extract(epoch FROM p_at) * 1000)::bigint $$;

-- An instant as JavaScript's toISOString() writes it: 2026-11-23T11:30:00.000Z.
CREATE FUNCTION kc_iso(p_at timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;

-- A time of day as the app writes a time slot: 5:00 PM.
CREATE FUNCTION kc_clock(p_time time) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT to_char(date '2000-01-01' + p_time, 'FMHH12:MI AM') $$;

-- A day as the app's notifications write it: Monday, November 23, 2026.
CREATE FUNCTION kc_long_date(p_day date) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT to_char(p_day, 'FMDay, FMMonth FMDD, YYYY') $$;

-- == Builders: one per event type, in the app's field names =================================
-- Every event: type, eventId, timestamp (ms), userId, role ('student' | 'trainer' | 'admin'),
-- metadata (optional in the app; given here), then the type's own fields. Dates are
-- YYYY-MM-DD in the student's time zone; instants are ISO 8601 in UTC.

CREATE FUNCTION kc_event(p_type text, p_key text, p_at timestamptz, p_user text, p_role text,
                         p_metadata jsonb, p_fields jsonb) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT jsonb_build_object('type', p_type, 'eventId', kc_event_id(p_type || ':' || p_key),
                                'timestamp', kc_epoch_ms(p_at), 'userId', p_user,
                                'role', p_role, 'metadata', p_metadata) || p_fields $$;

CREATE FUNCTION kc_event_purchase_created(p_purchase uuid, p_student uuid, p_course uuid,
                                          p_tier integer, p_metadata jsonb, p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('PURCHASE_CREATED', p_purchase::text, p_at, p_student::text, 'student',
                      p_metadata, jsonb_build_object(
                          'purchaseId', p_purchase, 'studentId', p_student,
                          'courseId', p_course, 'purchaseTier', p_tier)) $$;

CREATE FUNCTION kc_event_course_access_granted(p_purchase uuid, p_student uuid, p_course uuid,
                                               p_tier integer, p_metadata jsonb,
                                               p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('COURSE_ACCESS_GRANTED', p_purchase::text, p_at, p_student::text,
                      'student', p_metadata, jsonb_build_object(
                          'purchaseId', p_purchase, 'studentId', p_student,
                          'courseId', p_course, 'purchaseTier', p_tier)) $$;

CREATE FUNCTION kc_event_trainer_allocated(p_allocation uuid, p_trainer uuid, p_student uuid,
                                           p_course uuid, p_sessions integer, p_start date,
                                           p_end date, p_metadata jsonb, p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('TRAINER_ALLOCATED', p_allocation::text, p_at, p_student::text,
                      'student', p_metadata, jsonb_build_object(
                          'allocationId', p_allocation, 'trainerId', p_trainer,
                          'studentId', p_student, 'courseId', p_course,
                          'sessionCount', p_sessions, 'startDate', p_start::text,
                          'endDate', p_end::text)) $$;

CREATE FUNCTION kc_event_sessions_generated(p_allocation uuid, p_trainer uuid, p_student uuid,
                                            p_course uuid, p_sessions uuid[], p_start date,
                                            p_metadata jsonb, p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('SESSIONS_GENERATED', p_allocation || ':' || p_sessions[1], p_at,
                      p_student::text, 'student', p_metadata, jsonb_build_object(
                          'allocationId', p_allocation, 'trainerId', p_trainer,
                          'studentId', p_student, 'courseId', p_course,
                          'sessionCount', cardinality(p_sessions),
                          'sessionIds', to_jsonb(p_sessions), 'startDate', p_start::text)) $$;

CREATE FUNCTION kc_event_student_deallocated(p_allocation uuid, p_trainer uuid,
                                             p_student uuid, p_course uuid, p_reason text,
                                             p_at_instant timestamptz, p_metadata jsonb,
                                             p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('STUDENT_DEALLOCATED', p_allocation::text, p_at, p_trainer::text,
                      'trainer', p_metadata, jsonb_build_object(
                          'allocationId', p_allocation, 'trainerId', p_trainer,
                          'studentId', p_student, 'courseId', p_course, 'reason', p_reason,
                          'deallocatedAt', kc_iso(p_at_instant))) $$;

CREATE FUNCTION kc_event_session_rescheduled(p_session uuid, p_old_date date, p_new_date date,
                                             p_old_time time, p_new_time time,
                                             p_trainer uuid, p_student uuid, p_metadata jsonb,
                                             p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('SESSION_RESCHEDULED',
                      concat_ws(':', p_session, p_old_date, p_old_time, p_new_date, p_new_time),
                      p_at, p_student::text, 'student', p_metadata, jsonb_build_object(
                          'sessionId', p_session, 'oldDate', p_old_date::text,
                          'newDate', p_new_date::text, 'oldTimeSlot', kc_clock(p_old_time),
                          'newTimeSlot', kc_clock(p_new_time), 'trainerId', p_trainer,
                          'studentId', p_student)) $$;

CREATE FUNCTION kc_event_session_substituted(p_session uuid, p_original uuid,
                                             p_substitute uuid, p_student uuid, p_day date,
                                             p_time time, p_metadata jsonb, p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('SESSION_SUBSTITUTED',
                      concat_ws(':', p_session, p_original, p_substitute, p_day, p_time),
                      p_at, p_student::text, 'student', p_metadata, jsonb_build_object(
                          'sessionId', p_session, 'originalTrainerId', p_original,
                          'substituteTrainerId', p_substitute, 'studentId', p_student,
                          'date', p_day::text, 'timeSlot', kc_clock(p_time))) $$;

CREATE FUNCTION kc_event_session_completed(p_session uuid, p_trainer uuid, p_student uuid,
                                           p_course uuid, p_completed_at timestamptz,
                                           p_minutes integer, p_metadata jsonb,
                                           p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('SESSION_COMPLETED', p_session::text, p_at, p_student::text, 'student',
                      p_metadata, jsonb_build_object(
                          'sessionId', p_session, 'trainerId', p_trainer,
                          'studentId', p_student, 'courseId', p_course,
                          'completedAt', kc_iso(p_completed_at), 'duration', p_minutes)) $$;

CREATE FUNCTION kc_event_course_progress_updated(p_purchase uuid, p_student uuid,
                                                 p_course uuid, p_completed integer,
                                                 p_total integer, p_last timestamptz,
                                                 p_metadata jsonb, p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('COURSE_PROGRESS_UPDATED', p_purchase || ':' || p_completed, p_at,
                      p_student::text, 'student', p_metadata, jsonb_build_object(
                          'studentId', p_student, 'courseId', p_course,
                          'completedSessions', p_completed, 'totalSessions', p_total,
                          'percentage', least(100, floor(100.0 * p_completed
                                                         / greatest(p_total, 1)))::integer,
                          'lastCompletedAt', kc_iso(p_last))) $$;

CREATE FUNCTION kc_event_course_completed(p_purchase uuid, p_student uuid, p_course uuid,
                                          p_day date, p_total integer, p_completed integer,
                                          p_metadata jsonb, p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('COURSE_COMPLETED', p_purchase::text, p_at, p_student::text, 'student',
                      p_metadata, jsonb_build_object(
                          'courseId', p_course, 'studentId', p_student,
                          'completionDate', p_day::text, 'totalSessions', p_total,
                          'completedSessions', p_completed)) $$;

CREATE FUNCTION kc_event_admin_override(p_allocation uuid, p_admin text, p_action text,
                                        p_changes jsonb, p_reason text, p_metadata jsonb,
                                        p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('ADMIN_OVERRIDE', p_allocation::text, p_at, p_admin, 'admin',
                      p_metadata, jsonb_build_object(
                          'action', p_action, 'targetId', p_allocation,
                          'targetType', 'allocation', 'changes', p_changes,
                          'reason', p_reason)) $$;

-- p_key names what the notification is about (kind and row), so the same change never asks
-- twice: 'trainer_assignment:<allocation>', 'session_scheduled:<first session>' ...
CREATE FUNCTION kc_event_notification(p_key text, p_user uuid, p_role text, p_kind text,
                                      p_title text, p_body text, p_data jsonb,
                                      p_metadata jsonb, p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT kc_event('NOTIFICATION_REQUESTED', p_role || ':' || p_key, p_at, p_user::text,
                      p_role, p_metadata, jsonb_build_object(
                          'notificationType', p_kind, 'title', p_title, 'body', p_body,
                          'data', p_data)) $$;

-- Writes built events (each with the purchase it concerns), in the order given; returns how
-- many were new. Consumers waiting on LISTEN kc_business_events are woken at commit.
CREATE FUNCTION kc_store_events(p_purchases uuid[], p_events jsonb[]) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_stored integer;
BEGIN
    INSERT INTO business_events (event_id, type, purchase_id, payload)
    SELECT (e.payload ->> 'eventId')::uuid, e.payload ->> 'type', e.purchase_id, e.payload
    FROM unnest(p_purchases, p_events) WITH ORDINALITY AS e(purchase_id, payload, n)
    WHERE e.payload IS NOT NULL
    ORDER BY e.n
    ON CONFLICT (event_id) DO NOTHING;
    GET DIAGNOSTICS v_stored = ROW_COUNT;
    IF v_stored > 0 THEN
        PERFORM pg_notify('kc_business_events', '');
    END IF;
    RETURN v_stored;
END
$$;

-- == The triggers: every change to the output tables ========================================

-- New purchases: PURCHASE_CREATED and COURSE_ACCESS_GRANTED, with the payment's metadata as
-- the app sent it (what the old purchase worker put in both).
CREATE FUNCTION kc_purchase_events(p_ids uuid[]) RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_stored integer;
BEGIN
    WITH stored AS (
        INSERT INTO business_events (event_id, type, purchase_id, payload)
        SELECT (e.payload ->> 'eventId')::uuid, e.payload ->> 'type', pu.id, e.payload
        FROM student_course_purchases pu
        JOIN payments p ON p.id = pu.payment_id
        CROSS JOIN LATERAL (VALUES
            (1, kc_event_purchase_created(pu.id, pu.student_id, pu.course_id,
                                          pu.purchase_tier, p.metadata, now())),
            (2, kc_event_course_access_granted(pu.id, pu.student_id, pu.course_id,
                                               pu.purchase_tier, p.metadata, now()))
        ) AS e(k, payload)
        WHERE pu.id = ANY (p_ids)
        ORDER BY pu.id, e.k
        ON CONFLICT (event_id) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO v_stored FROM stored;
    IF v_stored > 0 THEN
        PERFORM pg_notify('kc_business_events', '');
    END IF;
    RETURN v_stored;
END
$$;

-- The triggers hand the rows to a function that keeps its plan (see kc_allocation_events): a
-- statement on the transition table itself is planned again at every call.
CREATE FUNCTION trg_events_purchases_inserted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_purchase_events(array_agg(id)) FROM new_purchases HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER student_course_purchases_events_inserted
    AFTER INSERT ON student_course_purchases REFERENCING NEW TABLE AS new_purchases
    FOR EACH STATEMENT EXECUTE FUNCTION trg_events_purchases_inserted();

-- A course finished (complete_finished sets completed_at): COURSE_COMPLETED and the student's
-- congratulations. Sessions delivered count completed and missed ones (a no-show is delivered).
CREATE FUNCTION trg_events_purchases_updated() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_store_events(array_agg(e.purchase_id ORDER BY n.id, e.k),
                            array_agg(e.payload ORDER BY n.id, e.k))
    FROM new_purchases n
    JOIN old_purchases o ON o.id = n.id
    JOIN students s ON s.id = n.student_id
    JOIN courses c ON c.id = n.course_id
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE ts.status IN ('completed', 'missed'))::integer AS done
        FROM tutoring_sessions ts JOIN trainer_allocations ta ON ta.id = ts.allocation_id
        WHERE ta.purchase_id = n.id
    ) d
    CROSS JOIN LATERAL (VALUES
        (1, n.id, kc_event_course_completed(
            n.id, n.student_id, n.course_id,
            (n.completed_at AT TIME ZONE s.timezone)::date, n.purchase_tier, d.done,
            jsonb_build_object('purchaseId', n.id), now())),
        (2, n.id, kc_event_notification(
            'course_completion:' || n.id, n.student_id, 'student', 'success',
            'Course Completed! 🎓🎉',
            format('Congratulations! You have successfully completed "%s". Great job on your '
                   'learning journey!', c.title),
            jsonb_build_object('courseName', c.title, 'type', 'course_completion',
                               'courseId', n.course_id, 'purchaseId', n.id),
            jsonb_build_object('purchaseId', n.id), now()))
    ) AS e(k, purchase_id, payload)
    WHERE o.completed_at IS NULL AND n.completed_at IS NOT NULL
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER student_course_purchases_events_updated
    AFTER UPDATE ON student_course_purchases
    REFERENCING OLD TABLE AS old_purchases NEW TABLE AS new_purchases
    FOR EACH STATEMENT EXECUTE FUNCTION trg_events_purchases_updated();

-- What an allocation's change means for the student, the trainer and the app. Called by the
-- allocations' triggers with the rows that changed and what they were before (NULL: new).
--   approved (new, or from pending):  TRAINER_ALLOCATED; the student's "Trainer Assigned"
--       ("Trainer Changed" when it replaces another trainer's allocation ended in this
--       transaction; nothing when the same trainer keeps a rescheduled course: the sessions
--       say it); the trainer's "New Assignment"; ADMIN_OVERRIDE when an override set rules
--       aside.
--   pending (new):  the student's "Finding Your Trainer", once: retries update the same row.
--   approved -> cancelled:  STUDENT_DEALLOCATED and the trainer's "Assignment Ended"; for a
--       reschedule only when another trainer (or nobody yet) takes the course, which the
--       allocation written next in the transaction tells (so it is written from there).
CREATE FUNCTION kc_allocation_events(p_ids uuid[], p_old_status text[]) RETURNS integer
LANGUAGE plpgsql
-- Planned once per session: a LANGUAGE sql function planned this statement at every call
-- (13 ms an allocation, measured), plpgsql's custom plans for its parameters cost 6 ms each
-- against 1 ms for the generic one, and a loop of plpgsql expressions 4 ms.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_stored integer;
BEGIN
    WITH changed AS (
        SELECT ta.*, c.old_status, s.full_name AS student_name, co.title AS course_title,
               t.full_name AS trainer_name, prev.id AS prev_id,
               prev.trainer_id AS prev_trainer, prev.reason AS prev_reason,
               prev.trainer_name AS prev_trainer_name, prev.updated_at AS prev_at,
               -- the allocation another trainer had until this transaction ended it
               (prev.id IS NOT NULL AND prev.trainer_id IS DISTINCT FROM ta.trainer_id)
                   AS trainer_changed
        FROM unnest(p_ids, p_old_status) AS c(id, old_status)
        JOIN trainer_allocations ta ON ta.id = c.id
        JOIN students s ON s.id = ta.student_id
        JOIN courses co ON co.id = ta.course_id
        LEFT JOIN trainers t ON t.id = ta.trainer_id
        LEFT JOIN LATERAL (
            SELECT p.id, p.trainer_id, p.reason, p.updated_at, pt.full_name AS trainer_name
            FROM trainer_allocations p JOIN trainers pt ON pt.id = p.trainer_id
            WHERE p.purchase_id = ta.purchase_id AND p.id <> ta.id AND p.status = 'cancelled'
              AND p.updated_at = now() AND p.allocated_at IS NOT NULL
            ORDER BY p.created_at DESC
            LIMIT 1
        ) prev ON ta.status IN ('approved', 'pending') AND c.old_status IS DISTINCT FROM ta.status
        WHERE c.old_status IS DISTINCT FROM ta.status
    ), built AS (
        SELECT ch.id, k, ch.purchase_id, payload
        FROM changed ch
        CROSS JOIN LATERAL (
            SELECT 1, kc_event_trainer_allocated(
                       ch.id, ch.trainer_id, ch.student_id, ch.course_id,
                       coalesce((ch.metadata #>> '{schedule,online}')::integer
                                + (ch.metadata #>> '{schedule,atHome}')::integer,
                                (ch.metadata ->> 'sessionCount')::integer),
                       ch.first_session_date,
                       coalesce((ch.metadata #>> '{schedule,lastDate}')::date,
                                ch.first_session_date),
                       jsonb_build_object('purchaseId', ch.purchase_id), now())
            WHERE ch.status = 'approved'
            UNION ALL
            -- the rescheduled course's old allocation, now that the new one is known
            SELECT 2, kc_event_student_deallocated(
                       ch.prev_id, ch.prev_trainer, ch.student_id, ch.course_id,
                       ch.prev_reason, ch.prev_at,
                       jsonb_build_object('purchaseId', ch.purchase_id,
                                          'nextAllocationId', ch.id), now())
            WHERE ch.trainer_changed AND ch.prev_reason = 'rescheduled'
            UNION ALL
            SELECT 3, kc_event_notification(
                       'trainer_assignment:' || ch.id, ch.student_id, 'student', 'allocation',
                       'Trainer Assigned',
                       format('Great news! Trainer %s has been assigned to your course "%s". '
                              'You will receive session details soon.',
                              ch.trainer_name, ch.course_title),
                       jsonb_build_object('trainerName', ch.trainer_name,
                                          'courseName', ch.course_title,
                                          'type', 'trainer_assignment',
                                          'trainerId', ch.trainer_id, 'allocationId', ch.id,
                                          'courseId', ch.course_id,
                                          'purchaseId', ch.purchase_id),
                       jsonb_build_object('purchaseId', ch.purchase_id), now())
            WHERE ch.status = 'approved' AND ch.prev_id IS NULL
            UNION ALL
            SELECT 3, kc_event_notification(
                       'trainer_changed:' || ch.id, ch.student_id, 'student', 'allocation',
                       'Trainer Changed',
                       format('Trainer %s will now teach your course "%s" in place of %s. '
                              'You will receive session details soon.',
                              ch.trainer_name, ch.course_title, ch.prev_trainer_name),
                       jsonb_build_object('trainerName', ch.trainer_name,
                                          'previousTrainerName', ch.prev_trainer_name,
                                          'courseName', ch.course_title,
                                          'type', 'trainer_changed', 'reason', ch.prev_reason,
                                          'trainerId', ch.trainer_id,
                                          'previousTrainerId', ch.prev_trainer,
                                          'allocationId', ch.id, 'courseId', ch.course_id,
                                          'purchaseId', ch.purchase_id),
                       jsonb_build_object('purchaseId', ch.purchase_id), now())
            WHERE ch.status = 'approved' AND ch.trainer_changed
            UNION ALL
            SELECT 4, kc_event_notification(
                       'trainer_assigned:' || ch.id, ch.trainer_id, 'trainer', 'allocation',
                       'New Assignment',
                       format('You have been assigned to teach "%s" for student %s. Check '
                              'your schedule for session details.',
                              ch.course_title, ch.student_name),
                       jsonb_build_object('studentName', ch.student_name,
                                          'courseName', ch.course_title,
                                          'type', 'trainer_assigned',
                                          'studentId', ch.student_id, 'allocationId', ch.id,
                                          'courseId', ch.course_id,
                                          'purchaseId', ch.purchase_id),
                       jsonb_build_object('purchaseId', ch.purchase_id), now())
            WHERE ch.status = 'approved'
              AND (ch.prev_id IS NULL OR ch.trainer_changed)
            UNION ALL
            SELECT 5, kc_event_admin_override(
                       ch.id, coalesce(r.requested_by, 'unknown'), 'assign_trainer',
                       jsonb_build_object(
                           'purchaseId', ch.purchase_id, 'trainerId', ch.trainer_id,
                           'previousTrainerId', ch.prev_trainer,
                           'overriddenRules', ch.metadata #> '{assignment,overriddenRules}',
                           'requestId', (ch.metadata #>> '{assignment,requestId}')::bigint),
                       coalesce(ch.metadata #>> '{assignment,note}', ''),
                       jsonb_build_object('purchaseId', ch.purchase_id), now())
            FROM (SELECT NULL) one
            LEFT JOIN allocation_requests r
                   ON r.id = (ch.metadata #>> '{assignment,requestId}')::bigint
            WHERE ch.status = 'approved'
              AND (ch.metadata #>> '{assignment,override}')::boolean
            UNION ALL
            SELECT 6, kc_event_notification(
                       'trainer_pending:' || ch.id, ch.student_id, 'student', 'allocation',
                       'Finding Your Trainer',
                       format('We are finding a trainer for your course "%s". We will let you '
                              'know as soon as one is assigned.', ch.course_title),
                       jsonb_build_object('courseName', ch.course_title,
                                          'type', 'trainer_pending', 'reason', ch.reason,
                                          'reasonDetail', ch.reason_detail,
                                          'allocationId', ch.id, 'courseId', ch.course_id,
                                          'purchaseId', ch.purchase_id),
                       jsonb_build_object('purchaseId', ch.purchase_id), now())
            WHERE ch.status = 'pending' AND ch.old_status IS NULL
            UNION ALL
            SELECT 7, kc_event_student_deallocated(
                       ch.id, ch.trainer_id, ch.student_id, ch.course_id, ch.reason,
                       ch.updated_at, jsonb_build_object('purchaseId', ch.purchase_id), now())
            WHERE ch.status = 'cancelled' AND ch.old_status = 'approved'
              AND ch.trainer_id IS NOT NULL AND ch.reason IS DISTINCT FROM 'rescheduled'
        ) AS e(k, payload)
    ), ended AS (
        -- the trainer hears that the student is no longer theirs, with the event
        SELECT b.id, b.k + 1 AS k, b.purchase_id, kc_event_notification(
                   'trainer_unassigned:' || (b.payload ->> 'allocationId'),
                   (b.payload ->> 'trainerId')::uuid, 'trainer', 'allocation',
                   'Assignment Ended',
                   format('Student %s is no longer assigned to you for "%s": %s. Their '
                          'upcoming sessions with you are cancelled.', s.full_name, co.title,
                          CASE b.payload ->> 'reason'
                              WHEN 'refunded' THEN 'the course was refunded'
                              WHEN 'trainer_left' THEN 'you can no longer take this course'
                              WHEN 'rescheduled' THEN
                                  'the student rescheduled and another trainer takes the new times'
                              ELSE 'the course moved to another trainer' END),
                   jsonb_build_object('studentName', s.full_name, 'courseName', co.title,
                                      'type', 'trainer_unassigned',
                                      'reason', b.payload ->> 'reason',
                                      'studentId', s.id, 'courseId', co.id,
                                      'allocationId', b.payload ->> 'allocationId',
                                      'purchaseId', b.purchase_id),
                   jsonb_build_object('purchaseId', b.purchase_id), now()) AS payload
        FROM built b
        JOIN students s ON s.id = (b.payload ->> 'studentId')::uuid
        JOIN courses co ON co.id = (b.payload ->> 'courseId')::uuid
        WHERE b.payload ->> 'type' = 'STUDENT_DEALLOCATED'
    ), ordered AS (
        SELECT * FROM built UNION ALL SELECT * FROM ended
    )
    , stored AS (
        INSERT INTO business_events (event_id, type, purchase_id, payload)
        SELECT (payload ->> 'eventId')::uuid, payload ->> 'type', purchase_id, payload
        FROM ordered
        ORDER BY id, k
        ON CONFLICT (event_id) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO v_stored FROM stored;
    IF v_stored > 0 THEN
        PERFORM pg_notify('kc_business_events', '');
    END IF;
    RETURN v_stored;
END
$$;

CREATE FUNCTION trg_events_allocations_inserted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_allocation_events(array_agg(id), array_agg(NULL::text))
    FROM new_allocations
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION trg_events_allocations_updated() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_allocation_events(array_agg(n.id), array_agg(o.status))
    FROM new_allocations n JOIN old_allocations o ON o.id = n.id
    WHERE o.status IS DISTINCT FROM n.status
    HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER trainer_allocations_events_inserted
    AFTER INSERT ON trainer_allocations REFERENCING NEW TABLE AS new_allocations
    FOR EACH STATEMENT EXECUTE FUNCTION trg_events_allocations_inserted();
CREATE TRIGGER trainer_allocations_events_updated
    AFTER UPDATE ON trainer_allocations
    REFERENCING OLD TABLE AS old_allocations NEW TABLE AS new_allocations
    FOR EACH STATEMENT EXECUTE FUNCTION trg_events_allocations_updated();

-- New sessions, one SESSIONS_GENERATED per allocation per statement (a first schedule, an
-- upgrade's extra sessions, a make-up), and the student's "Session Scheduled" (or "Sessions
-- Rescheduled" for the first sessions of an allocation that a reschedule made).
CREATE FUNCTION kc_sessions_events(p_ids uuid[]) RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_stored integer;
BEGIN
    WITH batch AS (
        SELECT n.allocation_id, array_agg(n.id ORDER BY n.session_number) AS ids,
               min(n.scheduled_date) AS first_day,
               (array_agg(n.scheduled_time ORDER BY n.session_number))[1] AS first_time
        FROM tutoring_sessions n
        WHERE n.id = ANY (p_ids)
        GROUP BY n.allocation_id
    ), told AS (
        SELECT b.*, ta.purchase_id, ta.trainer_id, ta.student_id, ta.course_id,
               t.full_name AS trainer_name, co.title AS course_title,
               ta.metadata ? 'reschedule'
               AND NOT EXISTS (SELECT 1 FROM tutoring_sessions x
                               WHERE x.allocation_id = b.allocation_id
                                 AND x.id <> ALL (b.ids)) AS moved
        FROM batch b
        JOIN trainer_allocations ta ON ta.id = b.allocation_id
        JOIN trainers t ON t.id = ta.trainer_id
        JOIN courses co ON co.id = ta.course_id
    )
    , stored AS (
        INSERT INTO business_events (event_id, type, purchase_id, payload)
        SELECT (e.payload ->> 'eventId')::uuid, e.payload ->> 'type', e.purchase_id, e.payload
        FROM (
            SELECT told.allocation_id, 1 AS k, told.purchase_id, kc_event_sessions_generated(
                       told.allocation_id, told.trainer_id, told.student_id, told.course_id,
                       told.ids, told.first_day,
                       jsonb_build_object('purchaseId', told.purchase_id), now()) AS payload
            FROM told
            UNION ALL
            SELECT told.allocation_id, 2, told.purchase_id, kc_event_notification(
                       CASE WHEN told.moved THEN 'sessions_rescheduled:' ELSE 'session_scheduled:'
                       END || told.ids[1], told.student_id, 'student', 'session',
                       CASE WHEN told.moved THEN 'Sessions Rescheduled' ELSE 'Session Scheduled' END,
                       CASE
                           WHEN told.moved THEN format(
                               'Your sessions of "%s" with %s have been moved: they now start on '
                               '%s at %s.', told.course_title, told.trainer_name,
                               kc_long_date(told.first_day), kc_clock(told.first_time))
                           WHEN cardinality(told.ids) = 1 THEN format(
                               'Your session with %s has been scheduled for %s at %s. Please be '
                               'ready!', told.trainer_name, kc_long_date(told.first_day),
                               kc_clock(told.first_time))
                           ELSE format(
                               'Your %s sessions of "%s" with %s have been scheduled, starting %s '
                               'at %s. Please be ready!', cardinality(told.ids), told.course_title,
                               told.trainer_name, kc_long_date(told.first_day),
                               kc_clock(told.first_time))
                       END,
                       jsonb_build_object(
                           'trainerName', told.trainer_name, 'courseName', told.course_title,
                           'scheduledDate', told.first_day::text,
                           'scheduledTime', kc_clock(told.first_time),
                           'sessionCount', cardinality(told.ids),
                           'type', CASE WHEN told.moved THEN 'sessions_rescheduled'
                                        ELSE 'session_scheduled' END,
                           'trainerId', told.trainer_id, 'allocationId', told.allocation_id,
                           'courseId', told.course_id, 'purchaseId', told.purchase_id),
                       jsonb_build_object('purchaseId', told.purchase_id), now())
            FROM told
        ) e
        ORDER BY e.allocation_id, e.k
        ON CONFLICT (event_id) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO v_stored FROM stored;
    IF v_stored > 0 THEN
        PERFORM pg_notify('kc_business_events', '');
    END IF;
    RETURN v_stored;
END
$$;

CREATE FUNCTION trg_events_sessions_inserted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_sessions_events(array_agg(id)) FROM new_sessions HAVING count(*) > 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER tutoring_sessions_events_inserted
    AFTER INSERT ON tutoring_sessions REFERENCING NEW TABLE AS new_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION trg_events_sessions_inserted();

-- Sessions that changed status: SESSION_COMPLETED for each completed one; one
-- COURSE_PROGRESS_UPDATED per purchase whose delivered count moved (completed or missed);
-- the student's "Session Cancelled" for sessions cancelled by the app, a refund or an
-- upgrade's refund (not for those a move cancels: the move tells the student itself).
CREATE FUNCTION trg_events_sessions_updated() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_stored integer;
BEGIN
    WITH changed AS (
        SELECT n.*, ta.purchase_id
        FROM new_sessions n
        JOIN old_sessions o ON o.id = n.id
        JOIN trainer_allocations ta ON ta.id = n.allocation_id
        WHERE n.status IS DISTINCT FROM o.status
    ), completed AS (
        SELECT c.id AS sort_id, 1 AS k, c.purchase_id, kc_event_session_completed(
                   c.id, c.trainer_id, c.student_id, c.course_id, c.ends_at,
                   c.duration_minutes,
                   jsonb_build_object('purchaseId', c.purchase_id,
                                      'allocationId', c.allocation_id), now()) AS payload
        FROM changed c
        WHERE c.status = 'completed'
    ), progress AS (
        SELECT pu.id AS sort_id, 2 AS k, pu.id AS purchase_id,
               kc_event_course_progress_updated(
                   pu.id, pu.student_id, pu.course_id, d.done, pu.purchase_tier, d.last_at,
                   jsonb_build_object('purchaseId', pu.id), now()) AS payload
        FROM (SELECT DISTINCT purchase_id FROM changed
              WHERE status IN ('completed', 'missed')) p
        JOIN student_course_purchases pu ON pu.id = p.purchase_id
        CROSS JOIN LATERAL (
            SELECT count(*)::integer AS done, max(ts.ends_at) AS last_at
            FROM tutoring_sessions ts JOIN trainer_allocations a ON a.id = ts.allocation_id
            WHERE a.purchase_id = pu.id AND ts.status IN ('completed', 'missed')
        ) d
    ), cancelled AS (
        SELECT g.first_id AS sort_id, 3 AS k, ta.purchase_id, kc_event_notification(
                   'session_cancelled:' || g.first_id, ta.student_id, 'student', 'session',
                   CASE WHEN g.n = 1 THEN 'Session Cancelled' ELSE 'Sessions Cancelled' END,
                   CASE WHEN g.n = 1
                        THEN format('Your session of "%s" on %s at %s has been cancelled.',
                                    co.title, kc_long_date(g.first_day),
                                    kc_clock(g.first_time))
                        ELSE format('Your %s upcoming sessions of "%s" from %s have been '
                                    'cancelled.', g.n, co.title, kc_long_date(g.first_day))
                   END || CASE WHEN ta.reason = 'refunded' AND ta.status = 'cancelled'
                               THEN ' The payment was refunded.' ELSE '' END,
                   jsonb_build_object('courseName', co.title, 'type', 'session_cancelled',
                                      'sessionIds', to_jsonb(g.ids), 'sessionCount', g.n,
                                      'scheduledDate', g.first_day::text,
                                      'scheduledTime', kc_clock(g.first_time),
                                      'allocationId', ta.id, 'courseId', co.id,
                                      'purchaseId', ta.purchase_id),
                   jsonb_build_object('purchaseId', ta.purchase_id), now()) AS payload
        FROM (SELECT c.allocation_id, count(*)::integer AS n,
                     array_agg(c.id ORDER BY c.session_number) AS ids,
                     (array_agg(c.id ORDER BY c.session_number))[1] AS first_id,
                     min(c.scheduled_date) AS first_day,
                     (array_agg(c.scheduled_time ORDER BY c.session_number))[1] AS first_time
              FROM changed c WHERE c.status = 'cancelled'
              GROUP BY c.allocation_id) g
        JOIN trainer_allocations ta ON ta.id = g.allocation_id
        JOIN courses co ON co.id = ta.course_id
        WHERE NOT (ta.status = 'cancelled'
                   AND ta.reason IN ('reassigned', 'trainer_left', 'rescheduled'))
    ), ordered AS (
        SELECT * FROM completed UNION ALL SELECT * FROM progress UNION ALL SELECT * FROM cancelled
    )
    SELECT kc_store_events(array_agg(purchase_id ORDER BY k, sort_id),
                           array_agg(payload ORDER BY k, sort_id))
    INTO v_stored
    FROM ordered;
    RETURN NULL;
END
$$;

CREATE TRIGGER tutoring_sessions_events_updated
    AFTER UPDATE ON tutoring_sessions
    REFERENCING OLD TABLE AS old_sessions NEW TABLE AS new_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION trg_events_sessions_updated();

-- == The feed: positions in commit order ====================================================

-- Numbers the events committed since the last run (see the top of this file). Runs under a
-- transaction-scoped lock, so numbering runs one at a time and each sees the last one's
-- work; the statement that reads the new events also takes the snapshot kept for next time.
-- Skipped (0) in a transaction that has written something (its own uncommitted events would
-- pass for committed) or that is not READ COMMITTED (its snapshot predates the lock).
CREATE FUNCTION kc_sequence_events() RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_placed integer;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL
       OR current_setting('transaction_isolation') <> 'read committed' THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('kc-business-events-sequencer', 0));
    WITH state AS (
        SELECT snapshot, last_position FROM business_event_sequencer
    ), fresh AS (
        SELECT e.event_id, row_number() OVER (ORDER BY e.seq) AS n
        FROM business_events e, state
        WHERE e.xid >= pg_snapshot_xmax(state.snapshot)
           OR e.xid IN (SELECT pg_snapshot_xip(state.snapshot))
    ), placed AS (
        INSERT INTO business_event_positions (position, event_id)
        SELECT state.last_position + fresh.n, fresh.event_id FROM fresh, state
        RETURNING position
    ), moved AS (
        -- Nothing new: the state stays (what was not visible then still is not numbered), and
        -- an idle reader's poll writes nothing.
        UPDATE business_event_sequencer
        SET snapshot = pg_current_snapshot(), last_position = (SELECT max(position) FROM placed),
            sequenced_at = now()
        WHERE EXISTS (SELECT 1 FROM placed)
        RETURNING 1
    )
    SELECT count(*) INTO v_placed FROM placed;
    RETURN v_placed;
END
$$;

-- Events after a position, in order: the committed ones, numbered first. A consumer keeps
-- the last position it handled and asks for what comes after it (LISTEN kc_business_events
-- wakes it when new events commit). Call it in its own transaction (autocommit).
CREATE FUNCTION events_after(p_position bigint, p_limit integer DEFAULT 500)
RETURNS TABLE (pos bigint, event_id uuid, type text, purchase_id uuid,
               occurred_at timestamptz, event jsonb)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF p_position IS NULL OR p_position < 0 THEN
        RAISE EXCEPTION 'events_after: a position is 0 or more, not %', p_position
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = '0 reads from the oldest event kept';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'events_after: a limit is 1 to 10000, not %', p_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM kc_sequence_events();
    RETURN QUERY
        SELECT p.position, e.event_id, e.type, e.purchase_id, e.occurred_at, e.payload
        FROM business_event_positions p
        JOIN business_events e ON e.event_id = p.event_id
        WHERE p.position > p_position
        ORDER BY p.position
        LIMIT p_limit;
END
$$;

CREATE FUNCTION kc_check_consumer(p_consumer text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_consumer IS NULL OR p_consumer !~ '^[a-z0-9][a-z0-9_.:-]{0,62}$' THEN
        RAISE EXCEPTION 'a consumer''s name is 1 to 63 of a-z, 0-9, _ . : - (starting with a '
                        'letter or digit), not %', quote_nullable(left(p_consumer, 80))
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- A consumer with a cursor kept here: from the next event on (default), or from the oldest
-- event kept. Registering again changes nothing; returns the consumer's position.
CREATE FUNCTION register_event_consumer(p_consumer text, p_from_start boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_check_consumer(p_consumer);
    IF p_from_start IS NULL THEN
        RAISE EXCEPTION 'from_start must be true or false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM kc_sequence_events();
    INSERT INTO business_event_consumers (consumer, position)
    SELECT p_consumer, CASE WHEN p_from_start THEN 0 ELSE s.last_position END
    FROM business_event_sequencer s
    ON CONFLICT (consumer) DO NOTHING;
    RETURN (SELECT c.position FROM business_event_consumers c WHERE c.consumer = p_consumer);
END
$$;

-- The events after a registered consumer's cursor (it does not move: advance_event_consumer).
CREATE FUNCTION consumer_events(p_consumer text, p_limit integer DEFAULT 500)
RETURNS TABLE (pos bigint, event_id uuid, type text, purchase_id uuid,
               occurred_at timestamptz, event jsonb)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_from bigint;
BEGIN
    PERFORM kc_check_consumer(p_consumer);
    SELECT c.position INTO v_from FROM business_event_consumers c WHERE c.consumer = p_consumer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no event consumer %', p_consumer
            USING ERRCODE = 'no_data_found',
                  HINT = format('SELECT register_event_consumer(%L) first', p_consumer);
    END IF;
    RETURN QUERY SELECT * FROM events_after(v_from, p_limit);
END
$$;

-- Moves a consumer's cursor forward to the last position it has handled (never back: two
-- copies of one consumer racing cannot undo each other's progress); returns the cursor.
CREATE FUNCTION advance_event_consumer(p_consumer text, p_position bigint) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_last     bigint;
    v_position bigint;
BEGIN
    PERFORM kc_check_consumer(p_consumer);
    SELECT last_position INTO v_last FROM business_event_sequencer;
    IF p_position IS NULL OR p_position < 0 OR p_position > v_last THEN
        RAISE EXCEPTION 'advance_event_consumer(%): position % is not between 0 and the last '
                        'event''s position %', p_consumer, p_position, v_last
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE business_event_consumers c
    SET position = greatest(c.position, p_position), updated_at = now()
    WHERE c.consumer = p_consumer
    RETURNING c.position INTO v_position;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no event consumer %', p_consumer
            USING ERRCODE = 'no_data_found',
                  HINT = format('SELECT register_event_consumer(%L) first', p_consumer);
    END IF;
    RETURN v_position;
END
$$;

-- An operator forgets a consumer (one that is gone holds back the pruning of events).
CREATE FUNCTION drop_event_consumer(p_consumer text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM kc_check_consumer(p_consumer);
    DELETE FROM business_event_consumers WHERE consumer = p_consumer;
    RETURN FOUND;
END
$$;

-- Per consumer: its cursor, how many events and how many seconds it is behind (events not
-- numbered yet count: nobody may be reading), when it last moved.
CREATE VIEW business_event_lag AS
SELECT c.consumer, c.position, q.last_position,
       (q.last_position - c.position) + q.unsequenced AS events_behind,
       coalesce(extract(epoch FROM now() - least(u.occurred_at, q.oldest_unsequenced)), 0)
           ::double precision AS seconds_behind,
       c.updated_at
FROM business_event_consumers c
CROSS JOIN (
    SELECT s.last_position, count(e.event_id) AS unsequenced,
           min(e.occurred_at) AS oldest_unsequenced
    FROM business_event_sequencer s
    LEFT JOIN business_events e
           ON e.xid >= pg_snapshot_xmax(s.snapshot)
              OR e.xid IN (SELECT pg_snapshot_xip(s.snapshot))
    GROUP BY s.last_position
) q
LEFT JOIN LATERAL (
    SELECT e.occurred_at FROM business_event_positions p
    JOIN business_events e ON e.event_id = p.event_id
    WHERE p.position > c.position
    ORDER BY p.position
    LIMIT 1
) u ON true;

-- Retention (the daily prune, beside prune_history): events older than p_keep that every
-- consumer has passed. An event a consumer has not handled stays, however old (make doctor
-- names a consumer that is far behind; drop_event_consumer forgets one that is gone).
CREATE FUNCTION prune_business_events(p_keep interval) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_deleted bigint;
BEGIN
    IF p_keep IS NULL OR p_keep < interval '0' THEN
        RAISE EXCEPTION 'prune_business_events: keep an interval of 0 or more, not %', p_keep
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH passed AS (
        SELECT min(position) AS upto, count(*) AS consumers FROM business_event_consumers
    ), doomed AS (
        SELECT e.event_id
        FROM business_events e
        LEFT JOIN business_event_positions p ON p.event_id = e.event_id
        CROSS JOIN passed
        WHERE e.occurred_at < now() - p_keep
          AND (passed.consumers = 0 OR p.position <= passed.upto)
    ), unplaced AS (
        DELETE FROM business_event_positions p USING doomed d WHERE p.event_id = d.event_id
    )
    DELETE FROM business_events e USING doomed d WHERE e.event_id = d.event_id;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END
$$;

-- == For issue 24 (moving one session, substitutes): the events it writes ====================

-- Call after moving a session (scheduled_date / scheduled_time changed), with where it was:
-- SESSION_RESCHEDULED and the student's "Session Rescheduled". Returns the event's id.
CREATE FUNCTION emit_session_rescheduled(p_session uuid, p_old_date date, p_old_time time)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v       record;
    v_event jsonb;
BEGIN
    IF p_old_date IS NULL OR p_old_time IS NULL THEN
        RAISE EXCEPTION 'emit_session_rescheduled(%): give the date and time the session had',
            p_session USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT ts.id, ts.scheduled_date, ts.scheduled_time, ts.trainer_id, ts.student_id,
           ts.course_id, ta.purchase_id, co.title
    INTO v
    FROM tutoring_sessions ts
    JOIN trainer_allocations ta ON ta.id = ts.allocation_id
    JOIN courses co ON co.id = ts.course_id
    WHERE ts.id = p_session;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no session %', p_session USING ERRCODE = 'no_data_found';
    END IF;
    IF (v.scheduled_date, v.scheduled_time) = (p_old_date, p_old_time) THEN
        RAISE EXCEPTION 'session % is still on % at %: move it first, then name where it was',
            p_session, p_old_date, kc_clock(p_old_time)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_event := kc_event_session_rescheduled(
        v.id, p_old_date, v.scheduled_date, p_old_time, v.scheduled_time, v.trainer_id,
        v.student_id, jsonb_build_object('purchaseId', v.purchase_id), now());
    PERFORM kc_store_events(ARRAY[v.purchase_id, v.purchase_id], ARRAY[
        v_event,
        kc_event_notification(
            'session_rescheduled:' || (v_event ->> 'eventId'), v.student_id, 'student',
            'session', 'Session Rescheduled',
            format('Your session of "%s" on %s at %s has moved to %s at %s.', v.title,
                   kc_long_date(p_old_date), kc_clock(p_old_time),
                   kc_long_date(v.scheduled_date), kc_clock(v.scheduled_time)),
            jsonb_build_object('courseName', v.title, 'type', 'session_rescheduled',
                               'sessionId', v.id, 'oldDate', p_old_date::text,
                               'newDate', v.scheduled_date::text,
                               'oldTimeSlot', kc_clock(p_old_time),
                               'newTimeSlot', kc_clock(v.scheduled_time),
                               'courseId', v.course_id, 'purchaseId', v.purchase_id),
            jsonb_build_object('purchaseId', v.purchase_id), now())]);
    RETURN (v_event ->> 'eventId')::uuid;
END
$$;

-- Call after giving a session to a substitute (tutoring_sessions.trainer_id changed), with
-- the trainer it had: SESSION_SUBSTITUTED and the student's "Trainer Substituted".
CREATE FUNCTION emit_session_substituted(p_session uuid, p_original_trainer uuid)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v          record;
    v_original text;
    v_event    jsonb;
BEGIN
    SELECT ts.id, ts.scheduled_date, ts.scheduled_time, ts.trainer_id, ts.student_id,
           ts.course_id, ta.purchase_id, co.title, t.full_name AS substitute
    INTO v
    FROM tutoring_sessions ts
    JOIN trainer_allocations ta ON ta.id = ts.allocation_id
    JOIN courses co ON co.id = ts.course_id
    JOIN trainers t ON t.id = ts.trainer_id
    WHERE ts.id = p_session;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no session %', p_session USING ERRCODE = 'no_data_found';
    END IF;
    SELECT full_name INTO v_original FROM trainers WHERE id = p_original_trainer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no trainer %', p_original_trainer USING ERRCODE = 'no_data_found';
    END IF;
    IF v.trainer_id = p_original_trainer THEN
        RAISE EXCEPTION 'session % is still with trainer %: give it to the substitute first',
            p_session, p_original_trainer USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_event := kc_event_session_substituted(
        v.id, p_original_trainer, v.trainer_id, v.student_id, v.scheduled_date,
        v.scheduled_time, jsonb_build_object('purchaseId', v.purchase_id), now());
    PERFORM kc_store_events(ARRAY[v.purchase_id, v.purchase_id], ARRAY[
        v_event,
        kc_event_notification(
            'session_substituted:' || (v_event ->> 'eventId'), v.student_id, 'student',
            'session', 'Trainer Substituted',
            format('Trainer %s will take your session of "%s" on %s at %s in place of %s.',
                   v.substitute, v.title, kc_long_date(v.scheduled_date),
                   kc_clock(v.scheduled_time), v_original),
            jsonb_build_object('trainerName', v.substitute, 'originalTrainerName', v_original,
                               'courseName', v.title, 'type', 'session_substituted',
                               'sessionId', v.id, 'date', v.scheduled_date::text,
                               'timeSlot', kc_clock(v.scheduled_time),
                               'trainerId', v.trainer_id,
                               'originalTrainerId', p_original_trainer,
                               'courseId', v.course_id, 'purchaseId', v.purchase_id),
            jsonb_build_object('purchaseId', v.purchase_id), now())]);
    RETURN (v_event ->> 'eventId')::uuid;
END
$$;

-- == Privileges ============================================================================

REVOKE EXECUTE ON FUNCTION
    trg_events_purchases_inserted(), trg_events_purchases_updated(),
    trg_events_allocations_inserted(), trg_events_allocations_updated(),
    trg_events_sessions_inserted(), trg_events_sessions_updated(),
    kc_store_events(uuid[], jsonb[]), kc_allocation_events(uuid[], text[]),
    kc_purchase_events(uuid[]), kc_sessions_events(uuid[]),
    kc_sequence_events(),
    events_after(bigint, integer), register_event_consumer(text, boolean),
    consumer_events(text, integer), advance_event_consumer(text, bigint),
    drop_event_consumer(text), prune_business_events(interval),
    emit_session_rescheduled(uuid, date, time), emit_session_substituted(uuid, uuid)
    FROM PUBLIC;
-- Readers of the feed (the relay runs as kc_worker, a member of kc_events).
GRANT EXECUTE ON FUNCTION events_after(bigint, integer), register_event_consumer(text, boolean),
    consumer_events(text, integer), advance_event_consumer(text, bigint) TO kc_events;
GRANT SELECT ON business_event_lag TO kc_events;
GRANT EXECUTE ON FUNCTION drop_event_consumer(text) TO kc_operator;
-- Operators read the feed too (`python -m workers events`, as kc_operator); reading moves no
-- cursor.
GRANT EXECUTE ON FUNCTION events_after(bigint, integer) TO kc_operator;
-- The worker's daily prune, and (issue 24) the moves and substitutes it will carry out.
GRANT EXECUTE ON FUNCTION prune_business_events(interval),
    emit_session_rescheduled(uuid, date, time), emit_session_substituted(uuid, uuid)
    TO kc_worker;
-- The default privileges give kc_worker every new sequence: the outbox's is the owner's alone.
REVOKE ALL ON SEQUENCE business_events_seq_seq FROM kc_worker;

-- Who may connect (migration 0015) was decided before kc_events existed: its members (the
-- app's SQL consumers) connect too. Granting CONNECT is the database owner's (or a
-- superuser's), as in 0015: done as the login that migrates, then back to the migration's role.
SELECT set_config('kc.migration_role', current_user, true);
SET LOCAL ROLE NONE;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO kc_events', current_database());
END
$$;
DO $$
BEGIN
    EXECUTE format('SET LOCAL ROLE %I', current_setting('kc.migration_role'));
END
$$;
