-- The whole schema as the migrations leave it: regenerate with `make schema`.
-- Read-only reference; change the schema with a new migration in sql/migrations/.
-- Each object's comment (COMMENT ON, from the migrations) is written above it, and a
-- table is followed by its constraints, indexes and triggers. pgqueuer's own objects
-- carry no comment: they are its business (sql/pgqueuer/).

-- EXTENSIONS
EXTENSION btree_gist SCHEMA extensions;

-- TYPES
TYPE pgqueuer_status AS ENUM ('queued', 'picked', 'successful', 'exception', 'canceled', 'deleted', 'failed');

-- TABLES, each with its constraints, indexes and triggers
TABLE alembic_version (
    version_num character varying(32) NOT NULL
);
CONSTRAINT alembic_version.alembic_version_pkc PRIMARY KEY (version_num);
CREATE UNIQUE INDEX alembic_version_pkc ON public.alembic_version USING btree (version_num);

-- An admin's assignment of a trainer to a purchase: the allocation stage carries it out with
-- the same rules (all but the ones an override sets aside) and closes it with the outcome. Kept
-- forever as the record of who asked for what.
TABLE allocation_requests (
    id bigint NOT NULL IDENTITY,
    purchase_id uuid NOT NULL,
    trainer_id uuid NOT NULL,
    -- Set aside the rules an admin may override (specialty, gender, range;
    -- workers/stages/allocation.py OVERRIDABLE); never activity or capacity.
    override boolean NOT NULL DEFAULT false,
    note text,
    -- Who asked: set by assign_trainer (a console operator as 'console:<name>'), never by a
    -- writer of the table (trg_requested_by_guard).
    requested_by text NOT NULL DEFAULT SESSION_USER,
    requested_at timestamp with time zone NOT NULL DEFAULT now(),
    -- open until the allocation stage decides it: done, refused (the trainer fails a rule that
    -- was not overridden) or superseded (a later request for the same purchase).
    status text NOT NULL DEFAULT 'open'::text,
    -- What the allocation stage did with the request, in a sentence.
    outcome text,
    decided_at timestamp with time zone,
    allocation_id uuid
);
CONSTRAINT allocation_requests.allocation_requests_allocation_id_fkey FOREIGN KEY (allocation_id) REFERENCES trainer_allocations(id);
CONSTRAINT allocation_requests.allocation_requests_check CHECK (((NOT override) OR (note IS NOT NULL)));
CONSTRAINT allocation_requests.allocation_requests_check1 CHECK (((status = 'open'::text) = (decided_at IS NULL)));
CONSTRAINT allocation_requests.allocation_requests_pkey PRIMARY KEY (id);
CONSTRAINT allocation_requests.allocation_requests_purchase_id_fkey FOREIGN KEY (purchase_id) REFERENCES student_course_purchases(id);
CONSTRAINT allocation_requests.allocation_requests_status_check CHECK ((status = ANY (ARRAY['open'::text, 'done'::text, 'refused'::text, 'superseded'::text])));
CONSTRAINT allocation_requests.allocation_requests_trainer_id_fkey FOREIGN KEY (trainer_id) REFERENCES trainers(id);
CREATE UNIQUE INDEX allocation_requests_one_open_idx ON public.allocation_requests USING btree (purchase_id) WHERE (status = 'open'::text);
CREATE UNIQUE INDEX allocation_requests_pkey ON public.allocation_requests USING btree (id);
-- requested_by is the operator function's to set (trg_requested_by_guard).
CREATE TRIGGER allocation_requests_requested_by BEFORE UPDATE OF requested_by ON public.allocation_requests FOR EACH ROW WHEN ((new.requested_by IS DISTINCT FROM old.requested_by)) EXECUTE FUNCTION trg_requested_by_guard();

-- Each registered reader of the business events and the last position it has handled; an event
-- is pruned only once every consumer has passed it.
TABLE business_event_consumers (
    consumer text NOT NULL,
    position bigint NOT NULL,
    registered_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now()
);
CONSTRAINT business_event_consumers.business_event_consumers_consumer_check CHECK ((consumer ~ '^[a-z0-9][a-z0-9_.:-]{0,62}$'::text));
CONSTRAINT business_event_consumers.business_event_consumers_pkey PRIMARY KEY (consumer);
CONSTRAINT business_event_consumers.business_event_consumers_position_check CHECK (("position" >= 0));
CREATE UNIQUE INDEX business_event_consumers_pkey ON public.business_event_consumers USING btree (consumer);

-- Each committed business event's place in the feed, in commit order (kc_sequence_events);
-- consumers read by position, never by seq.
TABLE business_event_positions (
    position bigint NOT NULL,
    event_id uuid NOT NULL
);
CONSTRAINT business_event_positions.business_event_positions_event_id_key UNIQUE (event_id);
CONSTRAINT business_event_positions.business_event_positions_pkey PRIMARY KEY ("position");
CREATE UNIQUE INDEX business_event_positions_event_id_key ON public.business_event_positions USING btree (event_id);
CREATE UNIQUE INDEX business_event_positions_pkey ON public.business_event_positions USING btree ("position");

-- One row: the snapshot of the sequencer's last run and the last position it gave, so each run
-- numbers exactly the events committed since.
TABLE business_event_sequencer (
    singleton boolean NOT NULL DEFAULT true,
    -- The transactions in flight at the last run: their events are numbered once they commit.
    snapshot pg_snapshot NOT NULL,
    last_position bigint NOT NULL DEFAULT 0,
    sequenced_at timestamp with time zone NOT NULL DEFAULT now()
);
CONSTRAINT business_event_sequencer.business_event_sequencer_pkey PRIMARY KEY (singleton);
CONSTRAINT business_event_sequencer.business_event_sequencer_singleton_check CHECK (singleton);
CREATE UNIQUE INDEX business_event_sequencer_pkey ON public.business_event_sequencer USING btree (singleton);

-- The outbox of business events for the app (docs/events.md): written by the triggers in the
-- transaction of each change, append-only, relayed to Redis; pruned by prune_business_events.
TABLE business_events (
    -- Stable for the same change (kc_event_id of the event's key): a change written twice is
    -- stored once.
    event_id uuid NOT NULL,
    -- Insertion order; not commit order, so consumers read business_event_positions instead.
    seq bigint NOT NULL IDENTITY,
    -- The writing transaction, for the sequencer to know when it has committed.
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    type text NOT NULL,
    purchase_id uuid,
    occurred_at timestamp with time zone NOT NULL DEFAULT now(),
    -- The event exactly as the app reads it (type, eventId, timestamp, userId, role, metadata
    -- and its fields).
    payload jsonb NOT NULL
);
CONSTRAINT business_events.business_events_check CHECK ((((payload ->> 'type'::text) = type) AND (((payload ->> 'eventId'::text))::uuid = event_id)));
CONSTRAINT business_events.business_events_pkey PRIMARY KEY (event_id);
CONSTRAINT business_events.business_events_type_check CHECK ((type = ANY (ARRAY['PURCHASE_CREATED'::text, 'COURSE_ACCESS_GRANTED'::text, 'TRAINER_ALLOCATED'::text, 'SESSIONS_GENERATED'::text, 'STUDENT_DEALLOCATED'::text, 'SESSION_RESCHEDULED'::text, 'SESSION_SUBSTITUTED'::text, 'SESSION_COMPLETED'::text, 'COURSE_PROGRESS_UPDATED'::text, 'COURSE_COMPLETED'::text, 'ADMIN_OVERRIDE'::text, 'NOTIFICATION_REQUESTED'::text])));
CREATE UNIQUE INDEX business_events_pkey ON public.business_events USING btree (event_id);
CREATE INDEX business_events_purchase_idx ON public.business_events USING btree (purchase_id);
CREATE INDEX business_events_xid_idx ON public.business_events USING btree (xid);

-- The people who may sign in to the operations console: a name and the hash of their token;
-- revoked operators stay as the record.
TABLE console_operators (
    id bigint NOT NULL IDENTITY,
    name text NOT NULL,
    -- SHA-256 of the operator's token; the token itself is never stored.
    token_hash bytea NOT NULL,
    token_issued_at timestamp with time zone NOT NULL DEFAULT now(),
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    created_by text NOT NULL DEFAULT SESSION_USER,
    revoked_at timestamp with time zone,
    revoked_by text
);
CONSTRAINT console_operators.console_operators_name_check CHECK (((name = btrim(name)) AND ((length(name) >= 1) AND (length(name) <= 60)) AND (name !~ '[[:cntrl:]]'::text)));
CONSTRAINT console_operators.console_operators_pkey PRIMARY KEY (id);
CONSTRAINT console_operators.console_operators_token_hash_check CHECK ((length(token_hash) = 32));
CONSTRAINT console_operators.console_operators_token_hash_key UNIQUE (token_hash);
CREATE UNIQUE INDEX console_operators_name_key ON public.console_operators USING btree (lower(name));
CREATE UNIQUE INDEX console_operators_pkey ON public.console_operators USING btree (id);
CREATE UNIQUE INDEX console_operators_token_hash_key ON public.console_operators USING btree (token_hash);

-- Console sign-ins: the hash of the session id kept in the browser's cookie, whose operator it
-- is and until when (12 hours).
TABLE console_sessions (
    -- SHA-256 of the session id; the id itself is only in the browser.
    id_hash bytea NOT NULL,
    operator_id bigint NOT NULL,
    signed_in_at timestamp with time zone NOT NULL DEFAULT now(),
    expires_at timestamp with time zone NOT NULL,
    ended_at timestamp with time zone,
    -- The browser's address and agent at sign-in, for the record.
    client text
);
CONSTRAINT console_sessions.console_sessions_client_check CHECK ((length(client) <= 100));
CONSTRAINT console_sessions.console_sessions_id_hash_check CHECK ((length(id_hash) = 32));
CONSTRAINT console_sessions.console_sessions_operator_id_fkey FOREIGN KEY (operator_id) REFERENCES console_operators(id);
CONSTRAINT console_sessions.console_sessions_pkey PRIMARY KEY (id_hash);
CREATE INDEX console_sessions_operator_idx ON public.console_sessions USING btree (operator_id) WHERE (ended_at IS NULL);
CREATE UNIQUE INDEX console_sessions_pkey ON public.console_sessions USING btree (id_hash);

-- The courses students buy; a trainer teaches a course when one of their specialties is its
-- category or subcategory.
TABLE courses (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    title text NOT NULL,
    category text NOT NULL,
    subcategory text,
    created_at timestamp with time zone NOT NULL DEFAULT now()
);
CONSTRAINT courses.courses_category_check CHECK ((btrim(category) <> ''::text));
CONSTRAINT courses.courses_pkey PRIMARY KEY (id);
CONSTRAINT courses.courses_subcategory_check CHECK ((btrim(subcategory) <> ''::text));
CONSTRAINT courses.courses_title_check CHECK ((btrim(title) <> ''::text));
CREATE UNIQUE INDEX courses_pkey ON public.courses USING btree (id);

-- Days on which no session is scheduled: a schedule skips them and runs longer, keeping its
-- count.
TABLE holidays (
    day date NOT NULL,
    reason text NOT NULL
);
CONSTRAINT holidays.holidays_pkey PRIMARY KEY (day);
CONSTRAINT holidays.holidays_reason_check CHECK ((btrim(reason) <> ''::text));
CREATE UNIQUE INDEX holidays_pkey ON public.holidays USING btree (day);

-- Every start of a pipeline job, counted before the stage runs and committed on its own, so an
-- attempt cut short by a crash still counts (pgqueuer re-picks such a job without counting).
TABLE job_starts (
    job_id bigint NOT NULL,
    stage text NOT NULL,
    ref_id uuid NOT NULL,
    starts integer NOT NULL DEFAULT 1,
    first_started_at timestamp with time zone NOT NULL DEFAULT now(),
    last_started_at timestamp with time zone NOT NULL DEFAULT now(),
    last_worker uuid
);
CONSTRAINT job_starts.job_starts_pkey PRIMARY KEY (job_id);
CREATE UNIQUE INDEX job_starts_pkey ON public.job_starts USING btree (job_id);

-- Who the operator function running in a backend acts for; a row lives only inside that
-- function's transaction (kc_begin_acting, kc_end_acting) and is the only source of
-- stage_history.actor.
TABLE kc_acting (
    pid integer NOT NULL,
    actor text NOT NULL,
    previous_setting text
);
CONSTRAINT kc_acting.kc_acting_pkey PRIMARY KEY (pid);
CREATE UNIQUE INDEX kc_acting_pkey ON public.kc_acting USING btree (pid);

-- One typed row of the values the moves' rules read (cut-off, auto-approval, the distance
-- between neighbouring sessions): the app and operators call the move functions straight in
-- SQL, with no worker environment in between. The owner changes them.
TABLE kc_settings (
    singleton boolean NOT NULL DEFAULT true,
    -- How far apart (km, between the students' homes) a trainer's home sessions in the hour
    -- before and after a session may be: the neighbours rule of every search (the allocation
    -- stage's, moves and substitutes). The one home of this value.
    max_sequential_km double precision NOT NULL DEFAULT 5,
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    move_cutoff interval NOT NULL DEFAULT '12:00:00'::interval,
    moves_auto_approve boolean NOT NULL DEFAULT false
);
CONSTRAINT kc_settings.kc_settings_max_sequential_km_check CHECK ((max_sequential_km > (0)::double precision));
CONSTRAINT kc_settings.kc_settings_move_cutoff_check CHECK (((move_cutoff >= '00:00:00'::interval) AND (move_cutoff <= '30 days'::interval)));
CONSTRAINT kc_settings.kc_settings_pkey PRIMARY KEY (singleton);
CONSTRAINT kc_settings.kc_settings_singleton_check CHECK (singleton);
CREATE UNIQUE INDEX kc_settings_pkey ON public.kc_settings USING btree (singleton);

-- A succeeded payment whose metadata cannot make a purchase, with every problem found. Kept and
-- replayable: fix payments.metadata (the payments trigger retries) or replay_stage('purchase',
-- id).
TABLE payment_rejections (
    payment_id uuid NOT NULL,
    reason text NOT NULL,
    -- Every problem found in one pass: a list of {field, message}.
    errors jsonb NOT NULL DEFAULT '[]'::jsonb,
    metadata jsonb,
    -- How many times this payment was tried and refused.
    rejections integer NOT NULL DEFAULT 1,
    rejected_at timestamp with time zone NOT NULL DEFAULT now(),
    -- When a later try made the purchase.
    resolved_at timestamp with time zone
);
CONSTRAINT payment_rejections.payment_rejections_payment_id_fkey FOREIGN KEY (payment_id) REFERENCES payments(id);
CONSTRAINT payment_rejections.payment_rejections_pkey PRIMARY KEY (payment_id);
CREATE UNIQUE INDEX payment_rejections_pkey ON public.payment_rejections USING btree (payment_id);

-- Payments as the payment service writes them: the pipeline's input. A payment that becomes
-- succeeded starts the pipeline; one that becomes refunded ends its purchase.
TABLE payments (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    student_id uuid NOT NULL,
    course_id uuid NOT NULL,
    amount_cents bigint NOT NULL,
    currency text NOT NULL DEFAULT 'INR'::text,
    -- initiated, succeeded, failed or refunded: succeeded starts the pipeline
    -- (payments_enqueue_purchase), refunded ends the purchase (payments_refunded).
    status text NOT NULL,
    -- The app's payment form (session count, slot, start date, mode ...); read by
    -- workers/rules/metadata.py, names and rules in docs/payment-metadata.md.
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    confirmed_at timestamp with time zone,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now()
);
CONSTRAINT payments.payments_amount_cents_check CHECK ((amount_cents >= 0));
CONSTRAINT payments.payments_course_id_fkey FOREIGN KEY (course_id) REFERENCES courses(id);
CONSTRAINT payments.payments_currency_check CHECK ((currency ~ '^[A-Z]{3}$'::text));
CONSTRAINT payments.payments_pkey PRIMARY KEY (id);
CONSTRAINT payments.payments_status_check CHECK ((status = ANY (ARRAY['initiated'::text, 'succeeded'::text, 'failed'::text, 'refunded'::text])));
CONSTRAINT payments.payments_student_id_fkey FOREIGN KEY (student_id) REFERENCES students(id);
CREATE UNIQUE INDEX payments_pkey ON public.payments USING btree (id);
CREATE INDEX payments_student_course_idx ON public.payments USING btree (student_id, course_id);
-- A succeeded payment starts the pipeline (trg_payments_enqueue_purchase).
CREATE TRIGGER payments_enqueue_purchase AFTER INSERT OR UPDATE OF status, metadata ON public.payments FOR EACH ROW EXECUTE FUNCTION trg_payments_enqueue_purchase();
-- A refunded payment ends its purchase (trg_payments_refunded).
CREATE TRIGGER payments_refunded AFTER UPDATE OF status ON public.payments FOR EACH ROW EXECUTE FUNCTION trg_payments_refunded();
-- Keeps updated_at current (trg_payments_touch).
CREATE TRIGGER payments_touch BEFORE UPDATE ON public.payments FOR EACH ROW EXECUTE FUNCTION trg_payments_touch();

TABLE pgqueuer (
    id bigint NOT NULL DEFAULT nextval('pgqueuer_id_seq'::regclass),
    priority integer NOT NULL,
    queue_manager_id uuid,
    created timestamp with time zone NOT NULL DEFAULT now(),
    updated timestamp with time zone NOT NULL DEFAULT now(),
    heartbeat timestamp with time zone NOT NULL DEFAULT now(),
    execute_after timestamp with time zone NOT NULL DEFAULT now(),
    status pgqueuer_status NOT NULL,
    entrypoint text NOT NULL,
    dedupe_key text,
    payload bytea,
    headers jsonb,
    attempts integer NOT NULL DEFAULT 0,
    slot bigint
);
CONSTRAINT pgqueuer.pgqueuer_pkey PRIMARY KEY (id);
CREATE INDEX pgqueuer_ep_ea_idx ON public.pgqueuer USING btree (entrypoint, execute_after) WHERE (status = 'queued'::pgqueuer_status);
CREATE INDEX pgqueuer_ep_prio_id_idx ON public.pgqueuer USING btree (entrypoint, priority DESC, id) WHERE (status = 'queued'::pgqueuer_status);
CREATE INDEX pgqueuer_picked_heartbeat_idx ON public.pgqueuer USING btree (heartbeat) WHERE (status = 'picked'::pgqueuer_status);
CREATE UNIQUE INDEX pgqueuer_picked_slot_idx ON public.pgqueuer USING btree (entrypoint, slot) WHERE ((status = 'picked'::pgqueuer_status) AND (slot IS NOT NULL));
CREATE UNIQUE INDEX pgqueuer_pkey ON public.pgqueuer USING btree (id);
CREATE INDEX pgqueuer_priority_id_id1_idx ON public.pgqueuer USING btree (priority, id DESC) INCLUDE (id) WHERE (status = 'queued'::pgqueuer_status);
CREATE INDEX pgqueuer_queue_manager_id_idx ON public.pgqueuer USING btree (queue_manager_id) WHERE (queue_manager_id IS NOT NULL);
CREATE UNIQUE INDEX pgqueuer_unique_dedupe_key ON public.pgqueuer USING btree (dedupe_key) WHERE ((status = ANY (ARRAY['queued'::pgqueuer_status, 'picked'::pgqueuer_status])) AND (dedupe_key IS NOT NULL));
CREATE INDEX pgqueuer_updated_id_id1_idx ON public.pgqueuer USING btree (updated, id DESC) INCLUDE (id) WHERE (status = 'picked'::pgqueuer_status);
-- The project's trigger on pgqueuer's table: follow-ups of finished jobs
-- (trg_pgqueuer_followups).
CREATE TRIGGER pgqueuer_followups AFTER DELETE ON public.pgqueuer REFERENCING OLD TABLE AS finished FOR EACH STATEMENT EXECUTE FUNCTION trg_pgqueuer_followups();
CREATE TRIGGER tg_pgqueuer_changed AFTER INSERT OR DELETE OR UPDATE OR TRUNCATE ON public.pgqueuer FOR EACH STATEMENT EXECUTE FUNCTION fn_pgqueuer_changed();

TABLE pgqueuer_log (
    id bigint NOT NULL IDENTITY,
    created timestamp with time zone NOT NULL DEFAULT now(),
    job_id bigint NOT NULL,
    status pgqueuer_status NOT NULL,
    priority integer NOT NULL,
    entrypoint text NOT NULL,
    traceback jsonb,
    aggregated boolean DEFAULT false
);
CONSTRAINT pgqueuer_log.pgqueuer_log_pkey PRIMARY KEY (id);
CREATE INDEX pgqueuer_log_created ON public.pgqueuer_log USING btree (created);
CREATE INDEX pgqueuer_log_job_id_status ON public.pgqueuer_log USING btree (job_id, created DESC);
CREATE INDEX pgqueuer_log_not_aggregated ON public.pgqueuer_log USING btree ((1)) WHERE (NOT aggregated);
CREATE UNIQUE INDEX pgqueuer_log_pkey ON public.pgqueuer_log USING btree (id);
CREATE INDEX pgqueuer_log_status ON public.pgqueuer_log USING btree (status);

TABLE pgqueuer_schedules (
    id bigint NOT NULL DEFAULT nextval('pgqueuer_schedules_id_seq'::regclass),
    expression text NOT NULL,
    entrypoint text NOT NULL,
    heartbeat timestamp with time zone NOT NULL DEFAULT now(),
    created timestamp with time zone NOT NULL DEFAULT now(),
    updated timestamp with time zone NOT NULL DEFAULT now(),
    next_run timestamp with time zone NOT NULL DEFAULT now(),
    last_run timestamp with time zone,
    status pgqueuer_status DEFAULT 'queued'::pgqueuer_status
);
CONSTRAINT pgqueuer_schedules.pgqueuer_schedules_expression_entrypoint_key UNIQUE (expression, entrypoint);
CONSTRAINT pgqueuer_schedules.pgqueuer_schedules_pkey PRIMARY KEY (id);
CREATE UNIQUE INDEX pgqueuer_schedules_expression_entrypoint_key ON public.pgqueuer_schedules USING btree (expression, entrypoint);
CREATE UNIQUE INDEX pgqueuer_schedules_pkey ON public.pgqueuer_schedules USING btree (id);

TABLE pgqueuer_statistics (
    id bigint NOT NULL DEFAULT nextval('pgqueuer_statistics_id_seq'::regclass),
    created timestamp with time zone NOT NULL DEFAULT date_trunc('sec'::text, now()),
    count bigint NOT NULL,
    priority integer NOT NULL,
    status pgqueuer_status NOT NULL,
    entrypoint text NOT NULL
);
CONSTRAINT pgqueuer_statistics.pgqueuer_statistics_pkey PRIMARY KEY (id);
CREATE UNIQUE INDEX pgqueuer_statistics_pkey ON public.pgqueuer_statistics USING btree (id);
CREATE UNIQUE INDEX pgqueuer_statistics_unique_count ON public.pgqueuer_statistics USING btree (priority, date_trunc('sec'::text, timezone('UTC'::text, created)), status, entrypoint);

-- An upgrade payment that raised an existing purchase's tier: one row per upgrade payment keeps
-- the purchase stage idempotent for it (the purchase keeps its first payment_id).
TABLE purchase_upgrades (
    payment_id uuid NOT NULL,
    purchase_id uuid NOT NULL,
    from_tier smallint NOT NULL,
    to_tier smallint NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    -- When the upgrade payment was refunded and the tier went back.
    reverted_at timestamp with time zone
);
CONSTRAINT purchase_upgrades.purchase_upgrades_check CHECK ((to_tier > from_tier));
CONSTRAINT purchase_upgrades.purchase_upgrades_payment_id_fkey FOREIGN KEY (payment_id) REFERENCES payments(id);
CONSTRAINT purchase_upgrades.purchase_upgrades_pkey PRIMARY KEY (payment_id);
CONSTRAINT purchase_upgrades.purchase_upgrades_purchase_id_fkey FOREIGN KEY (purchase_id) REFERENCES student_course_purchases(id);
CREATE UNIQUE INDEX purchase_upgrades_pkey ON public.purchase_upgrades USING btree (payment_id);
CREATE INDEX purchase_upgrades_purchase_idx ON public.purchase_upgrades USING btree (purchase_id);

-- reschedule() requests: the purchase's slot, start date or mode before and after. The
-- allocation stage re-plans the future sessions and closes the request; kept as the record of
-- who asked for what.
TABLE schedule_changes (
    id bigint NOT NULL IDENTITY,
    purchase_id uuid NOT NULL,
    from_time_slot time without time zone NOT NULL,
    to_time_slot time without time zone NOT NULL,
    from_start_date date NOT NULL,
    to_start_date date NOT NULL,
    from_schedule_mode text NOT NULL,
    to_schedule_mode text NOT NULL,
    -- Who asked: set by reschedule (a console operator as 'console:<name>'), never by a writer
    -- of the table (trg_requested_by_guard).
    requested_by text NOT NULL DEFAULT SESSION_USER,
    requested_at timestamp with time zone NOT NULL DEFAULT now(),
    -- open until the allocation stage has re-planned the sessions, then done.
    status text NOT NULL DEFAULT 'open'::text,
    outcome text,
    decided_at timestamp with time zone,
    allocation_id uuid
);
CONSTRAINT schedule_changes.schedule_changes_allocation_id_fkey FOREIGN KEY (allocation_id) REFERENCES trainer_allocations(id);
CONSTRAINT schedule_changes.schedule_changes_check CHECK (((status = 'open'::text) = (decided_at IS NULL)));
CONSTRAINT schedule_changes.schedule_changes_pkey PRIMARY KEY (id);
CONSTRAINT schedule_changes.schedule_changes_purchase_id_fkey FOREIGN KEY (purchase_id) REFERENCES student_course_purchases(id);
CONSTRAINT schedule_changes.schedule_changes_status_check CHECK ((status = ANY (ARRAY['open'::text, 'done'::text])));
CREATE INDEX schedule_changes_open_idx ON public.schedule_changes USING btree (purchase_id, id) WHERE (status = 'open'::text);
CREATE UNIQUE INDEX schedule_changes_pkey ON public.schedule_changes USING btree (id);
-- requested_by is the operator function's to set (trg_requested_by_guard).
CREATE TRIGGER schedule_changes_requested_by BEFORE UPDATE OF requested_by ON public.schedule_changes FOR EACH ROW WHEN ((new.requested_by IS DISTINCT FROM old.requested_by)) EXECUTE FUNCTION trg_requested_by_guard();

-- An enqueue that arrived while the row's job was already running: when that job leaves
-- pgqueuer's table, trg_pgqueuer_followups enqueues the stage again, so the change is not lost.
TABLE stage_followups (
    stage text NOT NULL,
    ref_id uuid NOT NULL,
    asked_at timestamp with time zone NOT NULL DEFAULT now()
);
CONSTRAINT stage_followups.stage_followups_pkey PRIMARY KEY (stage, ref_id);
CONSTRAINT stage_followups.stage_followups_stage_check CHECK ((stage = ANY (ARRAY['purchase'::text, 'allocation'::text, 'sessions'::text])));
CREATE UNIQUE INDEX stage_followups_pkey ON public.stage_followups USING btree (stage, ref_id);

-- What happened to each row at each stage (pgqueuer deletes a job when it succeeds); kept until
-- prune_history's retention.
TABLE stage_history (
    id bigint NOT NULL IDENTITY,
    stage text NOT NULL,
    -- The row the stage works on: a payment (purchase), a purchase (allocation) or an
    -- allocation (sessions).
    ref_id uuid NOT NULL,
    -- What happened: enqueued, succeeded, skipped, rejected, failed, replayed, healed, or the
    -- cause of an enqueue (refunded, completed, trainer_changed, rescheduled, makeup,
    -- assign_requested).
    event text NOT NULL,
    job_id bigint,
    detail text,
    error jsonb,
    at timestamp with time zone NOT NULL DEFAULT clock_timestamp(),
    -- The operator a replay or request acted for; set only by trg_stage_history_actor from
    -- kc_acting, never by the writer.
    actor text
);
CONSTRAINT stage_history.stage_history_event_check CHECK ((event = ANY (ARRAY['enqueued'::text, 'succeeded'::text, 'skipped'::text, 'rejected'::text, 'failed'::text, 'replayed'::text, 'healed'::text, 'refunded'::text, 'completed'::text, 'trainer_changed'::text, 'rescheduled'::text, 'makeup'::text, 'assign_requested'::text, 'move_requested'::text, 'move_approved'::text, 'move_rejected'::text, 'move_cancelled'::text, 'substituted'::text, 'substitute_ended'::text, 'leave'::text])));
CONSTRAINT stage_history.stage_history_pkey PRIMARY KEY (id);
CONSTRAINT stage_history.stage_history_stage_check CHECK ((stage = ANY (ARRAY['purchase'::text, 'allocation'::text, 'sessions'::text])));
CREATE UNIQUE INDEX stage_history_pkey ON public.stage_history USING btree (id);
CREATE INDEX stage_history_ref_idx ON public.stage_history USING btree (ref_id, at);
CREATE INDEX stage_history_stage_at_idx ON public.stage_history USING btree (stage, at);
-- The actor comes from kc_acting only (trg_stage_history_actor).
CREATE TRIGGER stage_history_actor BEFORE INSERT ON public.stage_history FOR EACH ROW WHEN (((new.actor IS NOT NULL) OR (current_setting('kc.acting'::text, true) = 'on'::text))) EXECUTE FUNCTION trg_stage_history_actor();

-- A student's course: the plan the purchase stage made from a payment's metadata, one per
-- payment. Output of the purchase stage, input of the allocation stage.
TABLE student_course_purchases (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    payment_id uuid NOT NULL,
    student_id uuid NOT NULL,
    course_id uuid NOT NULL,
    -- Sessions owed: 10, 20 or 30 (hybrid courses exactly 30); an upgrade raises it.
    purchase_tier smallint NOT NULL,
    start_date date NOT NULL,
    -- The wall-clock start of every session in the student's zone; the session ends by midnight
    -- (kc_slot_end).
    preferred_time_slot time without time zone NOT NULL,
    -- daily, weekdays or sunday_only (kc_mode_weekdays; the words a payment may use:
    -- kc_mode_of).
    schedule_mode text NOT NULL,
    session_duration_minutes smallint NOT NULL,
    -- The fields the metadata left out and the pipeline filled with a default, by name.
    defaults_applied text[] NOT NULL DEFAULT '{}'::text[],
    -- false once refunded (deactivated_at) or finished (completed_at).
    is_active boolean NOT NULL DEFAULT true,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    deactivated_at timestamp with time zone,
    -- home: every session at home; hybrid: 30 sessions, 1-6 online then alternating
    -- (kc_session_delivery).
    learning_mode text NOT NULL DEFAULT 'home'::text,
    group_size smallint NOT NULL DEFAULT 1,
    preferred_trainer_id uuid,
    -- The metadata keys the pipeline does not read, kept as sent.
    unused_metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    unused_keys text[] NOT NULL DEFAULT '{}'::text[],
    -- When every owed session was delivered (complete_finished).
    completed_at timestamp with time zone
);
CONSTRAINT student_course_purchases.student_course_purchases_check CHECK ((is_active OR (deactivated_at IS NOT NULL)));
CONSTRAINT student_course_purchases.student_course_purchases_completed_check CHECK (((completed_at IS NULL) OR ((NOT is_active) AND (deactivated_at IS NOT NULL))));
CONSTRAINT student_course_purchases.student_course_purchases_course_id_fkey FOREIGN KEY (course_id) REFERENCES courses(id);
CONSTRAINT student_course_purchases.student_course_purchases_group_size_check CHECK (((group_size >= 1) AND (group_size <= 3)));
CONSTRAINT student_course_purchases.student_course_purchases_hybrid_is_30 CHECK (((learning_mode <> 'hybrid'::text) OR (purchase_tier = 30)));
CONSTRAINT student_course_purchases.student_course_purchases_learning_mode_check CHECK ((learning_mode = ANY (ARRAY['home'::text, 'hybrid'::text])));
CONSTRAINT student_course_purchases.student_course_purchases_payment_id_fkey FOREIGN KEY (payment_id) REFERENCES payments(id);
CONSTRAINT student_course_purchases.student_course_purchases_payment_id_key UNIQUE (payment_id);
CONSTRAINT student_course_purchases.student_course_purchases_pkey PRIMARY KEY (id);
CONSTRAINT student_course_purchases.student_course_purchases_purchase_tier_check CHECK ((purchase_tier = ANY (ARRAY[10, 20, 30])));
CONSTRAINT student_course_purchases.student_course_purchases_schedule_mode_check CHECK ((schedule_mode = ANY (ARRAY['daily'::text, 'weekdays'::text, 'sunday_only'::text])));
CONSTRAINT student_course_purchases.student_course_purchases_session_duration_minutes_check CHECK (((session_duration_minutes >= 15) AND (session_duration_minutes <= 240)));
CONSTRAINT student_course_purchases.student_course_purchases_student_id_fkey FOREIGN KEY (student_id) REFERENCES students(id);
CONSTRAINT student_course_purchases.student_course_purchases_unused_metadata_check CHECK ((jsonb_typeof(unused_metadata) = 'object'::text));
CREATE UNIQUE INDEX student_course_purchases_one_active_idx ON public.student_course_purchases USING btree (student_id, course_id) WHERE is_active;
CREATE UNIQUE INDEX student_course_purchases_payment_id_key ON public.student_course_purchases USING btree (payment_id);
CREATE UNIQUE INDEX student_course_purchases_pkey ON public.student_course_purchases USING btree (id);
-- A new purchase goes to the allocation stage (trg_purchases_enqueue_allocation).
CREATE TRIGGER student_course_purchases_enqueue_allocation AFTER INSERT ON public.student_course_purchases FOR EACH ROW EXECUTE FUNCTION trg_purchases_enqueue_allocation();
-- Business events of new purchases (trg_events_purchases_inserted).
CREATE TRIGGER student_course_purchases_events_inserted AFTER INSERT ON public.student_course_purchases REFERENCING NEW TABLE AS new_purchases FOR EACH STATEMENT EXECUTE FUNCTION trg_events_purchases_inserted();
-- Business events of finished courses (trg_events_purchases_updated).
CREATE TRIGGER student_course_purchases_events_updated AFTER UPDATE ON public.student_course_purchases REFERENCING OLD TABLE AS old_purchases NEW TABLE AS new_purchases FOR EACH STATEMENT EXECUTE FUNCTION trg_events_purchases_updated();
-- An upgrade asks for the extra sessions (trg_purchases_tier_raised).
CREATE TRIGGER student_course_purchases_tier_raised AFTER UPDATE OF purchase_tier ON public.student_course_purchases FOR EACH ROW EXECUTE FUNCTION trg_purchases_tier_raised();

-- The students, with their home (for trainers' service radius and travel) and their IANA time
-- zone (for the local schedule).
TABLE students (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    full_name text NOT NULL,
    gender text,
    home_lat double precision NOT NULL,
    home_lng double precision NOT NULL,
    -- An IANA zone name: session dates and times are wall-clock values in it.
    timezone text NOT NULL DEFAULT 'Asia/Kolkata'::text,
    created_at timestamp with time zone NOT NULL DEFAULT now()
);
CONSTRAINT students.students_full_name_check CHECK ((btrim(full_name) <> ''::text));
CONSTRAINT students.students_home_lat_check CHECK (((home_lat >= ('-90'::integer)::double precision) AND (home_lat <= (90)::double precision)));
CONSTRAINT students.students_home_lng_check CHECK (((home_lng >= ('-180'::integer)::double precision) AND (home_lng <= (180)::double precision)));
CONSTRAINT students.students_pkey PRIMARY KEY (id);
CREATE UNIQUE INDEX students_pkey ON public.students USING btree (id);

-- A purchase's trainer (approved) or why it has none yet (pending, with the matching rule that
-- stopped it); cancelled or completed when it ends. One live allocation per purchase.
TABLE trainer_allocations (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    purchase_id uuid NOT NULL,
    student_id uuid NOT NULL,
    course_id uuid NOT NULL,
    trainer_id uuid,
    -- pending (no trainer fits yet), approved (live, counts toward capacity), cancelled or
    -- completed.
    status text NOT NULL,
    -- Why pending, or why it ended: a code of workers.rules.matching.Reason (the CHECK keeps
    -- them in step).
    reason text,
    reason_detail text,
    -- The decision's explanation: rules, eliminated counts, ranking, the chosen trainer, an
    -- admin's assignment and how the allocation ended.
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- How many times the allocation stage tried to find a trainer; the sweep waits longer after
    -- each (sweep_pending_allocations).
    attempts integer NOT NULL DEFAULT 1,
    first_session_date date,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    allocated_at timestamp with time zone,
    -- An admin assignment that may exceed the trainer's capacity.
    capacity_override boolean NOT NULL DEFAULT false
);
CONSTRAINT trainer_allocations.trainer_allocations_attempts_check CHECK ((attempts >= 1));
CONSTRAINT trainer_allocations.trainer_allocations_check CHECK (((status <> 'pending'::text) OR ((reason IS NOT NULL) AND (reason_detail IS NOT NULL) AND (trainer_id IS NULL))));
CONSTRAINT trainer_allocations.trainer_allocations_check1 CHECK (((status <> 'approved'::text) OR ((trainer_id IS NOT NULL) AND (allocated_at IS NOT NULL) AND (first_session_date IS NOT NULL))));
CONSTRAINT trainer_allocations.trainer_allocations_course_id_fkey FOREIGN KEY (course_id) REFERENCES courses(id);
CONSTRAINT trainer_allocations.trainer_allocations_id_student_course_key UNIQUE (id, student_id, course_id);
CONSTRAINT trainer_allocations.trainer_allocations_load_settle_deleted TRIGGER DEFERRABLE INITIALLY DEFERRED;
CONSTRAINT trainer_allocations.trainer_allocations_load_settle_inserted TRIGGER DEFERRABLE INITIALLY DEFERRED;
CONSTRAINT trainer_allocations.trainer_allocations_load_settle_updated TRIGGER DEFERRABLE INITIALLY DEFERRED;
CONSTRAINT trainer_allocations.trainer_allocations_pkey PRIMARY KEY (id);
CONSTRAINT trainer_allocations.trainer_allocations_purchase_id_fkey FOREIGN KEY (purchase_id) REFERENCES student_course_purchases(id);
CONSTRAINT trainer_allocations.trainer_allocations_reason_check CHECK ((reason = ANY (ARRAY['no_trainer'::text, 'no_specialty'::text, 'gender_mismatch'::text, 'out_of_range'::text, 'no_free_slot'::text, 'too_far_between_sessions'::text, 'at_capacity'::text, 'trainer_inactive'::text, 'refunded'::text, 'reassigned'::text, 'trainer_left'::text, 'rescheduled'::text])));
CONSTRAINT trainer_allocations.trainer_allocations_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'approved'::text, 'cancelled'::text, 'completed'::text])));
CONSTRAINT trainer_allocations.trainer_allocations_student_id_fkey FOREIGN KEY (student_id) REFERENCES students(id);
CONSTRAINT trainer_allocations.trainer_allocations_trainer_id_fkey FOREIGN KEY (trainer_id) REFERENCES trainers(id);
CREATE UNIQUE INDEX trainer_allocations_id_student_course_key ON public.trainer_allocations USING btree (id, student_id, course_id);
CREATE UNIQUE INDEX trainer_allocations_one_live_idx ON public.trainer_allocations USING btree (purchase_id) WHERE (status = ANY (ARRAY['pending'::text, 'approved'::text]));
CREATE INDEX trainer_allocations_pending_idx ON public.trainer_allocations USING btree (created_at) WHERE (status = 'pending'::text);
CREATE UNIQUE INDEX trainer_allocations_pkey ON public.trainer_allocations USING btree (id);
CREATE INDEX trainer_allocations_purchase_idx ON public.trainer_allocations USING btree (purchase_id);
CREATE INDEX trainer_allocations_student_course_idx ON public.trainer_allocations USING btree (student_id, course_id);
CREATE INDEX trainer_allocations_trainer_live_idx ON public.trainer_allocations USING btree (trainer_id) WHERE (status = 'approved'::text);
-- Capacity, the last line of defence (trg_allocations_check_capacity).
CREATE TRIGGER trainer_allocations_check_capacity BEFORE INSERT OR UPDATE OF status, trainer_id, capacity_override ON public.trainer_allocations FOR EACH ROW EXECUTE FUNCTION trg_allocations_check_capacity();
-- An approved allocation goes to the sessions stage (trg_allocations_enqueue_sessions).
CREATE TRIGGER trainer_allocations_enqueue_sessions AFTER INSERT OR UPDATE OF status, trainer_id ON public.trainer_allocations FOR EACH ROW EXECUTE FUNCTION trg_allocations_enqueue_sessions();
-- Business events of new allocations (trg_events_allocations_inserted).
CREATE TRIGGER trainer_allocations_events_inserted AFTER INSERT ON public.trainer_allocations REFERENCING NEW TABLE AS new_allocations FOR EACH STATEMENT EXECUTE FUNCTION trg_events_allocations_inserted();
-- Business events of changed allocations (trg_events_allocations_updated).
CREATE TRIGGER trainer_allocations_events_updated AFTER UPDATE ON public.trainer_allocations REFERENCING OLD TABLE AS old_allocations NEW TABLE AS new_allocations FOR EACH STATEMENT EXECUTE FUNCTION trg_events_allocations_updated();
-- Settles trainer_load at commit after a DELETE.
CREATE CONSTRAINT TRIGGER trainer_allocations_load_settle_deleted AFTER DELETE ON public.trainer_allocations DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ((old.status = 'approved'::text)) EXECUTE FUNCTION trg_allocations_load_settle();
-- Settles trainer_load at commit after an INSERT.
CREATE CONSTRAINT TRIGGER trainer_allocations_load_settle_inserted AFTER INSERT ON public.trainer_allocations DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ((new.status = 'approved'::text)) EXECUTE FUNCTION trg_allocations_load_settle();
-- Settles trainer_load at commit after an UPDATE.
CREATE CONSTRAINT TRIGGER trainer_allocations_load_settle_updated AFTER UPDATE OF status, trainer_id ON public.trainer_allocations DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ((((old.status = 'approved'::text) OR (new.status = 'approved'::text)) AND ((old.status IS DISTINCT FROM new.status) OR (old.trainer_id IS DISTINCT FROM new.trainer_id)))) EXECUTE FUNCTION trg_allocations_load_settle();
-- Remembers the trainers a DELETE touched (trainer_load).
CREATE TRIGGER trainer_allocations_load_touch_deleted AFTER DELETE ON public.trainer_allocations REFERENCING OLD TABLE AS old_allocations FOR EACH STATEMENT EXECUTE FUNCTION trg_allocations_load_touch();
-- Remembers the trainers an INSERT touched (trainer_load).
CREATE TRIGGER trainer_allocations_load_touch_inserted AFTER INSERT ON public.trainer_allocations REFERENCING NEW TABLE AS new_allocations FOR EACH STATEMENT EXECUTE FUNCTION trg_allocations_load_touch();
-- Remembers the trainers an UPDATE touched (trainer_load).
CREATE TRIGGER trainer_allocations_load_touch_updated AFTER UPDATE ON public.trainer_allocations REFERENCING OLD TABLE AS old_allocations NEW TABLE AS new_allocations FOR EACH STATEMENT EXECUTE FUNCTION trg_allocations_load_touch();
-- Ended allocations free capacity for waiting purchases (trg_allocations_retry_pending).
CREATE TRIGGER trainer_allocations_retry_pending AFTER UPDATE ON public.trainer_allocations REFERENCING OLD TABLE AS old_allocations NEW TABLE AS new_allocations FOR EACH STATEMENT EXECUTE FUNCTION trg_allocations_retry_pending();

-- When a trainer can teach: per ISO weekday (1 Monday .. 7 Sunday), a slot in local time; a
-- trainer is available for a schedule when a slot covers it on every weekday.
TABLE trainer_availability (
    trainer_id uuid NOT NULL,
    weekday smallint NOT NULL,
    slot_start time without time zone NOT NULL,
    slot_end time without time zone NOT NULL
);
CONSTRAINT trainer_availability.trainer_availability_check CHECK ((slot_end > slot_start));
CONSTRAINT trainer_availability.trainer_availability_pkey PRIMARY KEY (trainer_id, weekday, slot_start);
CONSTRAINT trainer_availability.trainer_availability_trainer_id_fkey FOREIGN KEY (trainer_id) REFERENCES trainers(id) ON DELETE CASCADE;
CONSTRAINT trainer_availability.trainer_availability_weekday_check CHECK (((weekday >= 1) AND (weekday <= 7)));
CREATE UNIQUE INDEX trainer_availability_pkey ON public.trainer_availability USING btree (trainer_id, weekday, slot_start);
-- New availability: waiting purchases tried again (trg_availability_retry_pending).
CREATE TRIGGER trainer_availability_added_retry_pending AFTER INSERT ON public.trainer_availability REFERENCING NEW TABLE AS new_availability FOR EACH STATEMENT EXECUTE FUNCTION trg_availability_retry_pending();
-- Changed availability: waiting purchases tried again (trg_availability_retry_pending).
CREATE TRIGGER trainer_availability_changed_retry_pending AFTER UPDATE ON public.trainer_availability REFERENCING NEW TABLE AS new_availability FOR EACH STATEMENT EXECUTE FUNCTION trg_availability_retry_pending();
-- Narrowed availability: live allocations checked (trg_availability_check_live_allocations).
CREATE TRIGGER trainer_availability_narrowed AFTER UPDATE ON public.trainer_availability REFERENCING OLD TABLE AS removed_availability FOR EACH STATEMENT EXECUTE FUNCTION trg_availability_check_live_allocations();
-- Removed availability: live allocations checked (trg_availability_check_live_allocations).
CREATE TRIGGER trainer_availability_removed AFTER DELETE ON public.trainer_availability REFERENCING OLD TABLE AS removed_availability FOR EACH STATEMENT EXECUTE FUNCTION trg_availability_check_live_allocations();

-- A trainer's days away (first_day..last_day, the students' local dates): requested, approved
-- or cancelled, with who did each and when. No two leaves of one trainer that are not cancelled
-- overlap (exclusion constraint).
TABLE trainer_leaves (
    id bigint NOT NULL IDENTITY,
    trainer_id uuid NOT NULL,
    first_day date NOT NULL,
    last_day date NOT NULL,
    reason text NOT NULL,
    status text NOT NULL DEFAULT 'requested'::text,
    requested_by text NOT NULL,
    requested_at timestamp with time zone NOT NULL DEFAULT now(),
    approved_by text,
    approved_at timestamp with time zone,
    cancelled_by text,
    cancelled_at timestamp with time zone,
    handed_over boolean NOT NULL DEFAULT false,
    outcome text
);
CONSTRAINT trainer_leaves.trainer_leaves_approved_check CHECK ((((approved_at IS NULL) = (approved_by IS NULL)) AND ((status <> 'approved'::text) OR (approved_at IS NOT NULL))));
CONSTRAINT trainer_leaves.trainer_leaves_cancelled_check CHECK ((((status = 'cancelled'::text) = (cancelled_at IS NOT NULL)) AND ((cancelled_at IS NULL) = (cancelled_by IS NULL))));
CONSTRAINT trainer_leaves.trainer_leaves_days_check CHECK ((last_day >= first_day));
CONSTRAINT trainer_leaves.trainer_leaves_length_check CHECK (((last_day - first_day) < 366));
CONSTRAINT trainer_leaves.trainer_leaves_no_overlap EXCLUDE USING gist (trainer_id WITH =, daterange(first_day, last_day, '[]'::text) WITH &&) WHERE ((status <> 'cancelled'::text));
CONSTRAINT trainer_leaves.trainer_leaves_pkey PRIMARY KEY (id);
CONSTRAINT trainer_leaves.trainer_leaves_reason_check CHECK (((btrim(reason) <> ''::text) AND (length(reason) <= 500)));
CONSTRAINT trainer_leaves.trainer_leaves_status_check CHECK ((status = ANY (ARRAY['requested'::text, 'approved'::text, 'cancelled'::text])));
CONSTRAINT trainer_leaves.trainer_leaves_trainer_id_fkey FOREIGN KEY (trainer_id) REFERENCES trainers(id);
CREATE INDEX trainer_leaves_approved_idx ON public.trainer_leaves USING btree (trainer_id, first_day) WHERE (status = 'approved'::text);
CREATE INDEX trainer_leaves_no_overlap ON public.trainer_leaves USING gist (trainer_id, daterange(first_day, last_day, '[]'::text)) WHERE (status <> 'cancelled'::text);
CREATE UNIQUE INDEX trainer_leaves_pkey ON public.trainer_leaves USING btree (id);

-- Approved allocations per trainer, settled at each commit that changes them (0020).
TABLE trainer_load (
    trainer_id uuid NOT NULL,
    live_allocations integer NOT NULL DEFAULT 0
);
CONSTRAINT trainer_load.trainer_load_live_allocations_check CHECK ((live_allocations >= 0));
CONSTRAINT trainer_load.trainer_load_pkey PRIMARY KEY (trainer_id);
CONSTRAINT trainer_load.trainer_load_trainer_id_fkey FOREIGN KEY (trainer_id) REFERENCES trainers(id) ON DELETE CASCADE;
CREATE UNIQUE INDEX trainer_load_pkey ON public.trainer_load USING btree (trainer_id);

-- Requests to move one session (the app's field names): who asked (student, trainer, operator),
-- from when to when and why; pending -> approved | rejected | cancelled, with who reviewed it
-- and when. One pending request per session (partial unique index).
TABLE trainer_reschedules (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    session_id uuid NOT NULL,
    allocation_id uuid NOT NULL,
    student_id uuid NOT NULL,
    trainer_id uuid NOT NULL,
    requested_by text NOT NULL,
    request_type text NOT NULL,
    original_date date NOT NULL,
    original_time time without time zone NOT NULL,
    new_date date NOT NULL,
    new_time time without time zone NOT NULL,
    reason text NOT NULL,
    notes text,
    status text NOT NULL DEFAULT 'pending'::text,
    reviewed_by text,
    reviewed_at timestamp with time zone,
    rejection_reason text,
    substitute_trainer_id uuid,
    outcome text,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now()
);
CONSTRAINT trainer_reschedules.trainer_reschedules_allocation_id_fkey FOREIGN KEY (allocation_id) REFERENCES trainer_allocations(id);
CONSTRAINT trainer_reschedules.trainer_reschedules_check CHECK (((status = 'pending'::text) = (reviewed_at IS NULL)));
CONSTRAINT trainer_reschedules.trainer_reschedules_check1 CHECK (((status = 'pending'::text) = (reviewed_by IS NULL)));
CONSTRAINT trainer_reschedules.trainer_reschedules_check2 CHECK (((status = 'rejected'::text) = (rejection_reason IS NOT NULL)));
CONSTRAINT trainer_reschedules.trainer_reschedules_check3 CHECK (((status = 'approved'::text) OR (substitute_trainer_id IS NULL)));
CONSTRAINT trainer_reschedules.trainer_reschedules_check4 CHECK ((substitute_trainer_id IS DISTINCT FROM trainer_id));
CONSTRAINT trainer_reschedules.trainer_reschedules_check5 CHECK (((new_date <> original_date) OR (new_time <> original_time)));
CONSTRAINT trainer_reschedules.trainer_reschedules_notes_check CHECK ((length(notes) <= 4000));
CONSTRAINT trainer_reschedules.trainer_reschedules_pkey PRIMARY KEY (id);
CONSTRAINT trainer_reschedules.trainer_reschedules_reason_check CHECK (((btrim(reason) <> ''::text) AND (length(reason) <= 1000)));
CONSTRAINT trainer_reschedules.trainer_reschedules_request_type_check CHECK ((request_type = ANY (ARRAY['student'::text, 'trainer'::text, 'operator'::text])));
CONSTRAINT trainer_reschedules.trainer_reschedules_session_id_fkey FOREIGN KEY (session_id) REFERENCES tutoring_sessions(id);
CONSTRAINT trainer_reschedules.trainer_reschedules_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'approved'::text, 'rejected'::text, 'cancelled'::text])));
CONSTRAINT trainer_reschedules.trainer_reschedules_student_id_fkey FOREIGN KEY (student_id) REFERENCES students(id);
CONSTRAINT trainer_reschedules.trainer_reschedules_substitute_trainer_id_fkey FOREIGN KEY (substitute_trainer_id) REFERENCES trainers(id);
CONSTRAINT trainer_reschedules.trainer_reschedules_trainer_id_fkey FOREIGN KEY (trainer_id) REFERENCES trainers(id);
CREATE INDEX trainer_reschedules_allocation_idx ON public.trainer_reschedules USING btree (allocation_id);
CREATE UNIQUE INDEX trainer_reschedules_one_pending_idx ON public.trainer_reschedules USING btree (session_id) WHERE (status = 'pending'::text);
CREATE INDEX trainer_reschedules_pending_idx ON public.trainer_reschedules USING btree (created_at) WHERE (status = 'pending'::text);
CREATE UNIQUE INDEX trainer_reschedules_pkey ON public.trainer_reschedules USING btree (id);
-- The events of an approved move, in its transaction.
CREATE TRIGGER trainer_reschedules_approved AFTER UPDATE OF status ON public.trainer_reschedules FOR EACH ROW WHEN (((new.status = 'approved'::text) AND (old.status = 'pending'::text))) EXECUTE FUNCTION trg_reschedules_approved();

-- The trainers: what they teach, where they are based, how far they travel, their rating (which
-- sets their capacity: kc_trainer_capacity).
TABLE trainers (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    full_name text NOT NULL,
    gender text,
    -- 0 to 5; sets how many live allocations the trainer may hold (kc_trainer_capacity).
    rating numeric(3,2),
    specialties text[] NOT NULL DEFAULT '{}'::text[],
    -- specialties lower-cased and trimmed (kc_lower_array), for matching a course's category
    -- and subcategory.
    specialties_norm text[] GENERATED ALWAYS AS (kc_lower_array(specialties)) STORED,
    base_lat double precision NOT NULL,
    base_lng double precision NOT NULL,
    -- How far from the base the trainer travels to a student's home.
    service_radius_km numeric(7,2) NOT NULL,
    status text NOT NULL DEFAULT 'active'::text,
    created_at timestamp with time zone NOT NULL DEFAULT now()
);
CONSTRAINT trainers.trainers_base_lat_check CHECK (((base_lat >= ('-90'::integer)::double precision) AND (base_lat <= (90)::double precision)));
CONSTRAINT trainers.trainers_base_lng_check CHECK (((base_lng >= ('-180'::integer)::double precision) AND (base_lng <= (180)::double precision)));
CONSTRAINT trainers.trainers_full_name_check CHECK ((btrim(full_name) <> ''::text));
CONSTRAINT trainers.trainers_pkey PRIMARY KEY (id);
CONSTRAINT trainers.trainers_rating_check CHECK (((rating >= (0)::numeric) AND (rating <= (5)::numeric)));
CONSTRAINT trainers.trainers_service_radius_km_check CHECK ((service_radius_km > (0)::numeric));
CONSTRAINT trainers.trainers_status_check CHECK ((status = ANY (ARRAY['active'::text, 'inactive'::text])));
CREATE INDEX trainers_active_base_idx ON public.trainers USING btree (base_lat, base_lng) WHERE (status = 'active'::text);
CREATE INDEX trainers_active_radius_idx ON public.trainers USING btree ((
CASE
    WHEN (status = 'active'::text) THEN service_radius_km
    ELSE NULL::numeric
END));
CREATE INDEX trainers_active_specialties_idx ON public.trainers USING gin (specialties_norm) WHERE (status = 'active'::text);
CREATE UNIQUE INDEX trainers_pkey ON public.trainers USING btree (id);
-- New trainers: waiting purchases tried again (trg_trainers_retry_pending).
CREATE TRIGGER trainers_added_retry_pending AFTER INSERT ON public.trainers REFERENCING NEW TABLE AS new_trainers FOR EACH STATEMENT EXECUTE FUNCTION trg_trainers_retry_pending();
-- Changed trainers: waiting purchases tried again (trg_trainers_retry_pending).
CREATE TRIGGER trainers_changed_retry_pending AFTER UPDATE ON public.trainers REFERENCING OLD TABLE AS old_trainers NEW TABLE AS new_trainers FOR EACH STATEMENT EXECUTE FUNCTION trg_trainers_retry_pending();
-- Changed trainers: live allocations checked (trg_trainers_check_live_allocations).
CREATE TRIGGER trainers_check_live_allocations AFTER UPDATE OF status, specialties, gender, service_radius_km, base_lat, base_lng ON public.trainers FOR EACH ROW EXECUTE FUNCTION trg_trainers_check_live_allocations();
-- A trainer_load row for every new trainer.
CREATE TRIGGER trainers_load_row AFTER INSERT ON public.trainers REFERENCING NEW TABLE AS new_trainers FOR EACH STATEMENT EXECUTE FUNCTION trg_trainers_load_row();

-- The sessions of an allocation, numbered from 1 per purchase; no two scheduled sessions of a
-- trainer overlap (tutoring_sessions_no_trainer_overlap).
TABLE tutoring_sessions (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    allocation_id uuid NOT NULL,
    session_number smallint NOT NULL,
    student_id uuid NOT NULL,
    trainer_id uuid NOT NULL,
    course_id uuid NOT NULL,
    -- The day in the student's zone.
    scheduled_date date NOT NULL,
    -- The wall-clock start in the student's zone (a time in a DST gap moves forward by the
    -- gap).
    scheduled_time time without time zone NOT NULL,
    -- The exact instant the session starts.
    starts_at timestamp with time zone NOT NULL,
    ends_at timestamp with time zone NOT NULL,
    duration_minutes smallint NOT NULL,
    -- scheduled, then completed or missed once started, or cancelled (and stays cancelled:
    -- trg_sessions_guard_status).
    status text NOT NULL DEFAULT 'scheduled'::text,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    cancelled_at timestamp with time zone,
    -- home or online, by the session's number (kc_session_delivery).
    delivery text NOT NULL DEFAULT 'home'::text,
    original_trainer_id uuid,
    substitution_leave_id bigint,
    substituted_at timestamp with time zone,
    cancel_reason text
);
CONSTRAINT tutoring_sessions.tutoring_sessions_allocation_fkey FOREIGN KEY (allocation_id, student_id, course_id) REFERENCES trainer_allocations(id, student_id, course_id);
CONSTRAINT tutoring_sessions.tutoring_sessions_allocation_id_session_number_key UNIQUE (allocation_id, session_number);
CONSTRAINT tutoring_sessions.tutoring_sessions_check CHECK ((ends_at = (starts_at + make_interval(mins => (duration_minutes)::integer))));
CONSTRAINT tutoring_sessions.tutoring_sessions_delivery_check CHECK ((delivery = ANY (ARRAY['home'::text, 'online'::text])));
CONSTRAINT tutoring_sessions.tutoring_sessions_duration_minutes_check CHECK (((duration_minutes >= 15) AND (duration_minutes <= 240)));
CONSTRAINT tutoring_sessions.tutoring_sessions_no_trainer_overlap EXCLUDE USING gist (trainer_id WITH =, tstzrange(starts_at, ends_at) WITH &&) WHERE ((status = 'scheduled'::text));
CONSTRAINT tutoring_sessions.tutoring_sessions_original_trainer_id_fkey FOREIGN KEY (original_trainer_id) REFERENCES trainers(id);
CONSTRAINT tutoring_sessions.tutoring_sessions_pkey PRIMARY KEY (id);
CONSTRAINT tutoring_sessions.tutoring_sessions_session_number_check CHECK ((session_number >= 1));
CONSTRAINT tutoring_sessions.tutoring_sessions_status_check CHECK ((status = ANY (ARRAY['scheduled'::text, 'completed'::text, 'missed'::text, 'cancelled'::text])));
CONSTRAINT tutoring_sessions.tutoring_sessions_substitute_check CHECK (((original_trainer_id IS DISTINCT FROM trainer_id) AND ((original_trainer_id IS NULL) = (substituted_at IS NULL)) AND ((substitution_leave_id IS NULL) OR (original_trainer_id IS NOT NULL) OR (status = 'cancelled'::text))));
CONSTRAINT tutoring_sessions.tutoring_sessions_substitution_leave_id_fkey FOREIGN KEY (substitution_leave_id) REFERENCES trainer_leaves(id);
CONSTRAINT tutoring_sessions.tutoring_sessions_trainer_id_fkey FOREIGN KEY (trainer_id) REFERENCES trainers(id);
CREATE UNIQUE INDEX tutoring_sessions_allocation_id_session_number_key ON public.tutoring_sessions USING btree (allocation_id, session_number);
CREATE INDEX tutoring_sessions_due_idx ON public.tutoring_sessions USING btree (ends_at) WHERE (status = 'scheduled'::text);
CREATE INDEX tutoring_sessions_leave_idx ON public.tutoring_sessions USING btree (substitution_leave_id) WHERE (substitution_leave_id IS NOT NULL);
CREATE INDEX tutoring_sessions_no_trainer_overlap ON public.tutoring_sessions USING gist (trainer_id, tstzrange(starts_at, ends_at)) WHERE (status = 'scheduled'::text);
CREATE UNIQUE INDEX tutoring_sessions_pkey ON public.tutoring_sessions USING btree (id);
CREATE INDEX tutoring_sessions_student_idx ON public.tutoring_sessions USING btree (student_id, starts_at);
CREATE INDEX tutoring_sessions_trainer_time_idx ON public.tutoring_sessions USING btree (trainer_id, starts_at) WHERE (status = 'scheduled'::text);
-- The hybrid split on update (trg_sessions_check_delivery).
CREATE TRIGGER tutoring_sessions_check_delivery BEFORE UPDATE OF delivery, session_number, allocation_id ON public.tutoring_sessions FOR EACH ROW EXECUTE FUNCTION trg_sessions_check_delivery();
-- The hybrid split on insert (trg_sessions_check_delivery_inserted).
CREATE TRIGGER tutoring_sessions_check_delivery_inserted AFTER INSERT ON public.tutoring_sessions REFERENCING NEW TABLE AS new_sessions FOR EACH STATEMENT EXECUTE FUNCTION trg_sessions_check_delivery_inserted();
-- Business events of new sessions (trg_events_sessions_inserted).
CREATE TRIGGER tutoring_sessions_events_inserted AFTER INSERT ON public.tutoring_sessions REFERENCING NEW TABLE AS new_sessions FOR EACH STATEMENT EXECUTE FUNCTION trg_events_sessions_inserted();
-- The events of a session that changed trainer at its own time.
CREATE TRIGGER tutoring_sessions_events_substituted AFTER UPDATE ON public.tutoring_sessions REFERENCING OLD TABLE AS old_sessions NEW TABLE AS new_sessions FOR EACH STATEMENT EXECUTE FUNCTION trg_events_sessions_substituted();
-- Business events of changed sessions (trg_events_sessions_updated).
CREATE TRIGGER tutoring_sessions_events_updated AFTER UPDATE ON public.tutoring_sessions REFERENCING OLD TABLE AS old_sessions NEW TABLE AS new_sessions FOR EACH STATEMENT EXECUTE FUNCTION trg_events_sessions_updated();
-- A session's status moves forward only (trg_sessions_guard_status).
CREATE TRIGGER tutoring_sessions_guard_status BEFORE UPDATE OF status ON public.tutoring_sessions FOR EACH ROW EXECUTE FUNCTION trg_sessions_guard_status();
-- Cancelled sessions of a live allocation get make-ups (trg_sessions_makeup).
CREATE TRIGGER tutoring_sessions_makeup AFTER UPDATE ON public.tutoring_sessions REFERENCING OLD TABLE AS old_sessions NEW TABLE AS new_sessions FOR EACH STATEMENT EXECUTE FUNCTION trg_sessions_makeup();
-- Cancelled sessions free time for waiting purchases (trg_sessions_retry_pending).
CREATE TRIGGER tutoring_sessions_retry_pending AFTER UPDATE ON public.tutoring_sessions REFERENCING NEW TABLE AS updated_sessions FOR EACH STATEMENT EXECUTE FUNCTION trg_sessions_retry_pending();
-- Records the original trainer beside a substituted session.
CREATE TRIGGER tutoring_sessions_substitute_columns BEFORE UPDATE OF trainer_id ON public.tutoring_sessions FOR EACH ROW WHEN ((new.trainer_id IS DISTINCT FROM old.trainer_id)) EXECUTE FUNCTION trg_sessions_substitute_columns();

-- VIEWS
-- Per consumer: its cursor, how many events and seconds it is behind, when it last moved (make
-- doctor warns of one far behind).
VIEW business_event_lag AS
 SELECT c.consumer,
    c."position",
    q.last_position,
    q.last_position - c."position" + q.unsequenced AS events_behind,
    COALESCE(EXTRACT(epoch FROM now() - LEAST(u.occurred_at, q.oldest_unsequenced)), 0::numeric)::double precision AS seconds_behind,
    c.updated_at
   FROM business_event_consumers c
     CROSS JOIN ( SELECT s.last_position,
            count(e.event_id) AS unsequenced,
            min(e.occurred_at) AS oldest_unsequenced
           FROM business_event_sequencer s
             LEFT JOIN business_events e ON e.xid >= pg_snapshot_xmax(s.snapshot) OR (e.xid IN ( SELECT pg_snapshot_xip(s.snapshot) AS pg_snapshot_xip))
          GROUP BY s.last_position) q
     LEFT JOIN LATERAL ( SELECT e.occurred_at
           FROM business_event_positions p
             JOIN business_events e ON e.event_id = p.event_id
          WHERE p."position" > c."position"
          ORDER BY p."position"
         LIMIT 1) u ON true;

-- Per purchase: sessions by status, what is ahead, whether and when the course finished, and
-- the latest change of trainer or schedule.
VIEW course_progress AS
 SELECT pu.id AS purchase_id,
    pu.purchase_tier,
    pu.is_active,
    pu.completed_at,
    COALESCE(n.completed, 0::bigint) AS sessions_completed,
    COALESCE(n.missed, 0::bigint) AS sessions_missed,
    COALESCE(n.cancelled, 0::bigint) AS sessions_cancelled,
    COALESCE(n.ahead, 0::bigint) AS sessions_ahead,
    n.next_at AS next_session_at,
    ended.reason AS last_change,
    ended.reason_detail AS last_change_detail,
    ended.updated_at AS last_change_at
   FROM student_course_purchases pu
     LEFT JOIN LATERAL ( SELECT count(*) FILTER (WHERE ts.status = 'completed'::text) AS completed,
            count(*) FILTER (WHERE ts.status = 'missed'::text) AS missed,
            count(*) FILTER (WHERE ts.status = 'cancelled'::text) AS cancelled,
            count(*) FILTER (WHERE ts.status = 'scheduled'::text AND ts.starts_at > now()) AS ahead,
            min(ts.starts_at) FILTER (WHERE ts.status = 'scheduled'::text AND ts.starts_at > now()) AS next_at
           FROM tutoring_sessions ts
             JOIN trainer_allocations ta ON ta.id = ts.allocation_id
          WHERE ta.purchase_id = pu.id) n ON true
     LEFT JOIN LATERAL ( SELECT ta.reason,
            ta.reason_detail,
            ta.updated_at
           FROM trainer_allocations ta
          WHERE ta.purchase_id = pu.id AND ta.status = 'cancelled'::text AND (ta.reason = ANY (ARRAY['reassigned'::text, 'trainer_left'::text, 'rescheduled'::text]))
          ORDER BY ta.updated_at DESC
         LIMIT 1) ended ON true;

-- Failed jobs (held after their last attempt) with the error, the traceback and the row;
-- replay_stage or replay_failed runs them again.
VIEW failed_jobs AS
 SELECT j.job_id,
    j.stage,
    j.ref_id,
    j.starts AS attempts,
    j.updated AS failed_at,
    e.error,
    e.error_detail ->> 'type'::text AS error_type,
    COALESCE(e.error_detail ->> 'traceback'::text, tb.traceback ->> 'traceback'::text) AS traceback,
        CASE j.stage
            WHEN 'purchase'::text THEN ( SELECT (to_jsonb(p.*) - 'metadata'::text) || jsonb_build_object('metadata', p.metadata)
               FROM payments p
              WHERE p.id = j.ref_id)
            WHEN 'allocation'::text THEN ( SELECT to_jsonb(pu.*) AS to_jsonb
               FROM student_course_purchases pu
              WHERE pu.id = j.ref_id)
            WHEN 'sessions'::text THEN ( SELECT to_jsonb(ta.*) - 'metadata'::text
               FROM trainer_allocations ta
              WHERE ta.id = j.ref_id)
            ELSE NULL::jsonb
        END AS row_data
   FROM stage_jobs j
     LEFT JOIN stage_last_error e ON e.stage = j.stage AND e.ref_id = j.ref_id
     LEFT JOIN LATERAL ( SELECT l.traceback
           FROM pgqueuer_log l
          WHERE l.job_id = j.job_id AND l.traceback IS NOT NULL
          ORDER BY l.created DESC
         LIMIT 1) tb ON true
  WHERE j.status = 'failed'::text;

-- The rows heal_pipeline enqueued again, from the history.
VIEW healed_rows AS
 SELECT stage_history.stage,
    stage_history.ref_id,
    stage_history.job_id,
    stage_history.at
   FROM stage_history
  WHERE stage_history.event = 'healed'::text;

-- The pipeline's queued and running jobs, with the row each is for.
VIEW live_jobs AS
 SELECT pgqueuer.id AS job_id,
    pgqueuer.entrypoint AS stage,
    kc_job_ref(pgqueuer.entrypoint, pgqueuer.dedupe_key) AS ref_id,
    pgqueuer.status,
    pgqueuer.attempts
   FROM pgqueuer
  WHERE (pgqueuer.status = ANY (ARRAY['queued'::pgqueuer_status, 'picked'::pgqueuer_status])) AND kc_job_ref(pgqueuer.entrypoint, pgqueuer.dedupe_key) IS NOT NULL;

-- Per purchase: where it is in the pipeline, stage by stage (the console's and make trace's
-- overview).
VIEW purchase_stages AS
 SELECT p.id AS payment_id,
    p.student_id,
    p.course_id,
    p.status AS payment_status,
    p.updated_at AS payment_at,
    pj.status AS purchase_job,
    pj.starts AS purchase_attempts,
    pe.error AS purchase_error,
    rj.reason AS rejected_reason,
    rj.errors AS rejected_errors,
    pu.id AS purchase_id,
    pu.created_at AS purchase_at,
    pu.purchase_tier,
    pu.is_active,
    aj.status AS allocation_job,
    aj.starts AS allocation_attempts,
    ae.error AS allocation_error,
    ta.id AS allocation_id,
    ta.status AS allocation_status,
    ta.trainer_id,
    ta.reason AS allocation_reason,
    ta.reason_detail AS allocation_reason_detail,
    ta.attempts AS allocation_tries,
    ta.allocated_at,
    sj.status AS sessions_job,
    sj.starts AS sessions_attempts,
    se.error AS sessions_error,
    ss.written AS sessions_written,
    ss.first_at AS first_session_at,
    ss.written_at AS sessions_at,
    pu.learning_mode,
    pu.group_size,
    pu.preferred_trainer_id,
    (ta.metadata -> 'preferredTrainer'::text) ->> 'outcome'::text AS preferred_trainer_outcome,
    pu.defaults_applied,
    pu.unused_keys
   FROM payments p
     LEFT JOIN student_course_purchases pu ON pu.payment_id = p.id
     LEFT JOIN payment_rejections rj ON rj.payment_id = p.id AND rj.resolved_at IS NULL
     LEFT JOIN LATERAL ( SELECT a.id,
            a.purchase_id,
            a.student_id,
            a.course_id,
            a.trainer_id,
            a.status,
            a.reason,
            a.reason_detail,
            a.metadata,
            a.attempts,
            a.first_session_date,
            a.created_at,
            a.updated_at,
            a.allocated_at,
            a.capacity_override
           FROM trainer_allocations a
          WHERE a.purchase_id = pu.id
          ORDER BY (a.status = ANY (ARRAY['pending'::text, 'approved'::text])) DESC, a.created_at DESC
         LIMIT 1) ta ON true
     LEFT JOIN LATERAL ( SELECT count(*) FILTER (WHERE s.status <> 'cancelled'::text) AS written,
            min(s.starts_at) FILTER (WHERE s.status <> 'cancelled'::text) AS first_at,
            max(s.created_at) AS written_at
           FROM tutoring_sessions s
             JOIN trainer_allocations a2 ON a2.id = s.allocation_id
          WHERE a2.purchase_id = pu.id) ss ON pu.id IS NOT NULL
     LEFT JOIN stage_jobs pj ON pj.stage = 'purchase'::text AND pj.ref_id = p.id
     LEFT JOIN stage_jobs aj ON aj.stage = 'allocation'::text AND aj.ref_id = pu.id
     LEFT JOIN stage_jobs sj ON sj.stage = 'sessions'::text AND sj.ref_id = ta.id
     LEFT JOIN stage_last_error pe ON pe.stage = 'purchase'::text AND pe.ref_id = p.id AND pe.at >= p.updated_at
     LEFT JOIN stage_last_error ae ON ae.stage = 'allocation'::text AND ae.ref_id = pu.id AND ae.at >= pu.created_at
     LEFT JOIN stage_last_error se ON se.stage = 'sessions'::text AND se.ref_id = ta.id AND se.at >= ta.created_at;

-- Everything that happened to one purchase, from its payment to its sessions, in order (make
-- trace).
VIEW purchase_trace AS
 SELECT s.payment_id,
    s.student_id,
    s.course_id,
    s.payment_status,
    s.payment_at,
    s.purchase_job,
    s.purchase_attempts,
    s.purchase_error,
    s.rejected_reason,
    s.rejected_errors,
    s.purchase_id,
    s.purchase_at,
    s.purchase_tier,
    s.is_active,
    s.allocation_job,
    s.allocation_attempts,
    s.allocation_error,
    s.allocation_id,
    s.allocation_status,
    s.trainer_id,
    s.allocation_reason,
    s.allocation_reason_detail,
    s.allocation_tries,
    s.allocated_at,
    s.sessions_job,
    s.sessions_attempts,
    s.sessions_error,
    s.sessions_written,
    s.first_session_at,
    s.sessions_at,
    s.learning_mode,
    s.group_size,
    s.preferred_trainer_id,
    s.preferred_trainer_outcome,
    s.defaults_applied,
    s.unused_keys,
    cp.completed_at,
    cp.sessions_completed,
    cp.sessions_missed,
    cp.sessions_cancelled,
    cp.sessions_ahead,
    cp.next_session_at,
    cp.last_change,
    cp.last_change_detail,
    cp.last_change_at
   FROM purchase_stages s
     LEFT JOIN course_progress cp ON cp.purchase_id = s.purchase_id;

-- Payments refused by the purchase stage, with the problems and the metadata, for an operator
-- to correct.
VIEW rejected_payments AS
 SELECT r.payment_id,
    p.student_id,
    p.course_id,
    r.reason,
    r.errors,
    r.metadata,
    r.rejections,
    r.rejected_at
   FROM payment_rejections r
     JOIN payments p ON p.id = r.payment_id
  WHERE r.resolved_at IS NULL;

-- Every pipeline job in pgqueuer's table with its stage, row and status.
VIEW stage_jobs AS
 SELECT j.id AS job_id,
    j.entrypoint AS stage,
    kc_job_ref(j.entrypoint, j.dedupe_key) AS ref_id,
    j.status::text AS status,
    j.created AS enqueued_at,
    j.execute_after,
    j.updated,
    j.heartbeat,
    j.queue_manager_id,
    j.attempts AS retries,
    COALESCE(s.starts, 0) AS starts
   FROM pgqueuer j
     LEFT JOIN job_starts s ON s.job_id = j.id
  WHERE kc_job_ref(j.entrypoint, j.dedupe_key) IS NOT NULL;

-- The latest failure message of each (stage, row).
VIEW stage_last_error AS
 SELECT DISTINCT ON (stage_history.stage, stage_history.ref_id) stage_history.stage,
    stage_history.ref_id,
    stage_history.detail AS error,
    stage_history.error AS error_detail,
    stage_history.at
   FROM stage_history
  WHERE stage_history.event = 'failed'::text
  ORDER BY stage_history.stage, stage_history.ref_id, stage_history.at DESC, stage_history.id DESC;

-- The latest event of each (stage, row) from the history.
VIEW stage_last_event AS
 SELECT DISTINCT ON (stage_history.stage, stage_history.ref_id) stage_history.stage,
    stage_history.ref_id,
    stage_history.event,
    stage_history.detail,
    stage_history.error,
    stage_history.at
   FROM stage_history
  ORDER BY stage_history.stage, stage_history.ref_id, stage_history.at DESC, stage_history.id DESC;

-- Per stage: queued, in flight, failed, oldest waiting age, and p50/p95 latency from the
-- enqueue to the outcome over the last hour.
VIEW stage_overview AS
 WITH stages(stage) AS (
         VALUES ('purchase'::text), ('allocation'::text), ('sessions'::text)
        ), jobs AS (
         SELECT stage_jobs.stage,
            count(*) FILTER (WHERE stage_jobs.status = 'queued'::text) AS queued,
            count(*) FILTER (WHERE stage_jobs.status = 'picked'::text) AS in_flight,
            count(*) FILTER (WHERE stage_jobs.status = 'failed'::text) AS failed,
            max(now() - stage_jobs.enqueued_at) FILTER (WHERE stage_jobs.status = 'queued'::text) AS oldest_waiting
           FROM stage_jobs
          GROUP BY stage_jobs.stage
        ), latency AS (
         SELECT done.stage,
            done.at - started.at AS took
           FROM stage_history done
             CROSS JOIN LATERAL ( SELECT e.at
                   FROM stage_history e
                  WHERE e.stage = done.stage AND e.ref_id = done.ref_id AND (e.event = ANY (ARRAY['enqueued'::text, 'replayed'::text, 'healed'::text])) AND e.at <= done.at
                  ORDER BY e.at DESC
                 LIMIT 1) started
          WHERE (done.event = ANY (ARRAY['succeeded'::text, 'skipped'::text, 'rejected'::text])) AND done.at > (now() - '01:00:00'::interval)
        )
 SELECT s.stage,
    COALESCE(j.queued, 0::bigint) AS queued,
    COALESCE(j.in_flight, 0::bigint) AS in_flight,
    COALESCE(j.failed, 0::bigint) AS failed,
    j.oldest_waiting,
    ( SELECT count(*) AS count
           FROM latency l
          WHERE l.stage = s.stage) AS done_last_hour,
    ( SELECT percentile_cont(0.5::double precision) WITHIN GROUP (ORDER BY l.took) AS percentile_cont
           FROM latency l
          WHERE l.stage = s.stage) AS p50_latency,
    ( SELECT percentile_cont(0.95::double precision) WITHIN GROUP (ORDER BY l.took) AS percentile_cont
           FROM latency l
          WHERE l.stage = s.stage) AS p95_latency
   FROM stages s
     LEFT JOIN jobs j ON j.stage = s.stage
  ORDER BY (array_position(ARRAY['purchase'::text, 'allocation'::text, 'sessions'::text], s.stage));

-- stuck_rows() with its defaults: rows whose next stage is missing.
VIEW stuck AS
 SELECT stuck_rows.stage,
    stuck_rows.ref_id,
    stuck_rows.since,
    stuck_rows.waiting_for,
    stuck_rows.job_status
   FROM stuck_rows() stuck_rows(stage, ref_id, since, waiting_for, job_status);

-- The old app's table by its field names: one row per session a substitute now teaches
-- (session_date, original and substitute trainer, student, the leave).
VIEW trainer_session_substitutions AS
 SELECT ts.id AS session_id,
    ts.scheduled_date AS session_date,
    ts.scheduled_time AS session_time,
    ts.original_trainer_id,
    ts.trainer_id AS substitute_trainer_id,
    ts.student_id,
    ts.allocation_id,
    ts.substitution_leave_id AS leave_id,
    ts.substituted_at,
    ts.status
   FROM tutoring_sessions ts
  WHERE ts.original_trainer_id IS NOT NULL;

-- Approved allocations whose trainer no longer meets the rules for what is still ahead (an
-- admin override sets aside specialty, gender and range); the lifecycle ends them.
VIEW unfit_allocations AS
 SELECT ta.id AS allocation_id,
    ta.purchase_id,
    ta.student_id,
    ta.trainer_id,
    why.reason AS why,
        CASE why.reason
            WHEN 'inactive'::text THEN 'the trainer is inactive'::text
            WHEN 'no_specialty'::text THEN 'the trainer no longer teaches '::text || c.title
            WHEN 'gender_mismatch'::text THEN 'the trainer no longer matches the student''s gender '::text || 'preference'::text
            WHEN 'out_of_range'::text THEN 'the student''s home is outside the trainer''s service radius'::text
            WHEN 'on_leave'::text THEN ( SELECT format('the trainer is on leave from %s to %s (leave %s: %s), longer than a substitute per session covers'::text, l.first_day, l.last_day, l.id, l.reason) AS format
               FROM trainer_leaves l
              WHERE l.trainer_id = ta.trainer_id AND l.status = 'approved'::text AND l.handed_over AND l.last_day >= kc_leave_today()
              ORDER BY l.first_day
             LIMIT 1)
            ELSE 'the trainer''s availability no longer covers the slot on a session day'::text
        END AS detail
   FROM trainer_allocations ta
     JOIN trainers t ON t.id = ta.trainer_id
     JOIN students s ON s.id = ta.student_id
     JOIN courses c ON c.id = ta.course_id
     JOIN student_course_purchases pu ON pu.id = ta.purchase_id
     CROSS JOIN LATERAL ( SELECT COALESCE((ta.metadata #>> '{assignment,override}'::text[])::boolean, false) AS overridden) o
     CROSS JOIN LATERAL ( SELECT
                CASE
                    WHEN t.status <> 'active'::text THEN 'inactive'::text
                    WHEN NOT o.overridden AND NOT t.specialties_norm && array_remove(ARRAY[lower(btrim(c.category)), lower(btrim(c.subcategory))], NULL::text) THEN 'no_specialty'::text
                    WHEN NOT o.overridden AND lower(btrim(t.gender)) <> lower(btrim(s.gender)) THEN 'gender_mismatch'::text
                    WHEN NOT o.overridden AND kc_haversine_km(s.home_lat, s.home_lng, t.base_lat, t.base_lng) > t.service_radius_km::double precision THEN 'out_of_range'::text
                    WHEN (EXISTS ( SELECT 1
                       FROM trainer_leaves l
                         JOIN tutoring_sessions ts ON ts.allocation_id = ta.id AND ts.status = 'scheduled'::text AND ts.starts_at > now() AND ts.scheduled_date >= l.first_day AND ts.scheduled_date <= l.last_day
                      WHERE l.trainer_id = ta.trainer_id AND l.status = 'approved'::text AND l.handed_over)) THEN 'on_leave'::text
                    WHEN (EXISTS ( SELECT 1
                       FROM ( SELECT DISTINCT EXTRACT(isodow FROM ts.scheduled_date)::smallint AS weekday,
                                ts.scheduled_time AS slot_start,
                                kc_slot_end(ts.scheduled_time, ts.duration_minutes::integer) AS slot_end
                               FROM tutoring_sessions ts
                              WHERE ts.allocation_id = ta.id AND ts.status = 'scheduled'::text AND ts.starts_at > now() AND ts.trainer_id = ta.trainer_id
                            UNION ALL
                             SELECT d.d,
                                pu.preferred_time_slot,
                                kc_slot_end(pu.preferred_time_slot, pu.session_duration_minutes::integer) AS kc_slot_end
                               FROM unnest(kc_mode_weekdays(pu.schedule_mode)) d(d)
                              WHERE NOT (EXISTS ( SELECT 1
                                       FROM tutoring_sessions x
                                      WHERE x.allocation_id = ta.id))) need
                      WHERE NOT (EXISTS ( SELECT 1
                               FROM trainer_availability av
                              WHERE av.trainer_id = ta.trainer_id AND av.weekday = need.weekday AND av.slot_start <= need.slot_start AND av.slot_end >= need.slot_end)))) THEN 'unavailable'::text
                    ELSE NULL::text
                END AS reason) why
  WHERE ta.status = 'approved'::text AND why.reason IS NOT NULL AND ((EXISTS ( SELECT 1
           FROM tutoring_sessions ts
          WHERE ts.allocation_id = ta.id AND ts.status = 'scheduled'::text AND ts.starts_at > now())) OR NOT (EXISTS ( SELECT 1
           FROM tutoring_sessions ts
          WHERE ts.allocation_id = ta.id)));

-- FUNCTIONS
-- Moves a consumer's cursor forward to the last position it handled (never back: two copies of
-- one consumer cannot undo each other's progress); returns the cursor.
CREATE OR REPLACE FUNCTION public.advance_event_consumer(p_consumer text, p_position bigint)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- Ends the purchase of a refunded payment (or reverts an upgrade): the allocation cancelled,
-- future sessions cancelled. Refuses a payment that is not refunded.
CREATE OR REPLACE FUNCTION public.apply_refund(p_payment uuid)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    PERFORM kc_require_refunded(p_payment);
    RETURN kc_apply_refund_unchecked(p_payment);
END
$function$

-- An operator approves a leave: each scheduled session of the trainer in those days gets the
-- best substitute who fits it, or is cancelled with its make-up; a leave longer than
-- p_handover_days hands the courses over instead. One row per session changed.
CREATE OR REPLACE FUNCTION public.approve_leave(p_leave bigint, p_handover_days integer DEFAULT 14, p_session text DEFAULT NULL::text)
 RETURNS SETOF kc_leave_change
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_actor text := kc_begin_acting(kc_operator_actor(p_session));
BEGIN
    RETURN QUERY SELECT * FROM kc_approve_leave(p_leave, p_handover_days, v_actor);
    PERFORM kc_end_acting();
END
$function$

-- An operator approves a pending move: carried out in one transaction under the rules for that
-- session, or refused with the rule's sentence; with p_substitute the best other trainer takes
-- the session instead.
CREATE OR REPLACE FUNCTION public.approve_session_move(p_request uuid, p_substitute boolean DEFAULT false, p_session text DEFAULT NULL::text)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_actor   text := kc_begin_acting(kc_operator_actor(p_session));
    v_outcome text := kc_approve_move(p_request, p_substitute, v_actor);
BEGIN
    PERFORM kc_end_acting();
    RETURN v_outcome;
END
$function$

-- An operator's request to give a purchase to a trainer (optionally overriding the rules an
-- admin may set aside), recorded in allocation_requests and carried out by the allocation
-- stage.
CREATE OR REPLACE FUNCTION public.assign_trainer(p_purchase uuid, p_trainer uuid, p_override boolean DEFAULT false, p_note text DEFAULT NULL::text, p_session text DEFAULT NULL::text)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- An operator cancels a leave: requested, it closes; approved, its future sessions go back to
-- their trainer where still free (the others stay with their substitute). One row per session.
CREATE OR REPLACE FUNCTION public.cancel_leave(p_leave bigint, p_session text DEFAULT NULL::text)
 RETURNS SETOF kc_leave_change
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_actor text := kc_begin_acting(kc_operator_actor(p_session));
BEGIN
    RETURN QUERY SELECT * FROM kc_cancel_leave(p_leave, v_actor);
    PERFORM kc_end_acting();
END
$function$

-- The requester (the app) or an operator withdraws a pending move.
CREATE OR REPLACE FUNCTION public.cancel_session_move(p_request uuid, p_session text DEFAULT NULL::text)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- One bounded, idempotent pass of time passing: ended sessions become completed, allocations
-- with every owed session delivered complete, and their courses finish.
CREATE OR REPLACE FUNCTION public.complete_finished(p_grace interval DEFAULT '01:00:00'::interval, p_limit integer DEFAULT 2000)
 RETURNS TABLE(sessions_completed integer, courses_completed integer)
 LANGUAGE plpgsql
AS $function$
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
$function$

-- Adds a console operator, or gives a revoked one a new token; the token must look like one the
-- CLI makes (no short or guessable token).
CREATE OR REPLACE FUNCTION public.console_operator_add(p_name text, p_token text)
 RETURNS TABLE(operator text, reinstated boolean)
 LANGUAGE plpgsql
AS $function$
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
$function$

-- How many operators may sign in (the console refuses to listen beyond loopback with none).
CREATE OR REPLACE FUNCTION public.console_operator_count()
 RETURNS integer
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$ SELECT count(*)::integer FROM console_operators WHERE revoked_at IS NULL $function$

-- Revokes an operator: their token stops working and every session of theirs ends now; returns
-- the sessions ended.
CREATE OR REPLACE FUNCTION public.console_operator_revoke(p_name text)
 RETURNS integer
 LANGUAGE plpgsql
AS $function$
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
$function$

-- The operator and expiry of a live console session (no row: not signed in); the console's
-- check on every request.
CREATE OR REPLACE FUNCTION public.console_session(p_session text)
 RETURNS TABLE(operator text, expires_at timestamp with time zone)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$ SELECT * FROM kc_console_operator(p_session) $function$

-- Signs in with an operator's token: records a session whose id the console made and keeps in
-- the browser; no row when the token is no live operator's.
CREATE OR REPLACE FUNCTION public.console_sign_in(p_token text, p_session text, p_client text DEFAULT NULL::text)
 RETURNS TABLE(operator text, expires_at timestamp with time zone)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- Ends a console session; false when it was not live.
CREATE OR REPLACE FUNCTION public.console_sign_out(p_session text)
 RETURNS boolean
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    WITH ended AS (
        UPDATE console_sessions SET ended_at = now()
        WHERE id_hash = sha256(convert_to(p_session, 'UTF8')) AND length(p_session) <= 200
          AND ended_at IS NULL
        RETURNING 1
    )
    SELECT count(*) > 0 FROM ended
$function$

-- The events after a registered consumer's cursor (the cursor does not move:
-- advance_event_consumer).
CREATE OR REPLACE FUNCTION public.consumer_events(p_consumer text, p_limit integer DEFAULT 500)
 RETURNS TABLE(pos bigint, event_id uuid, type text, purchase_id uuid, occurred_at timestamp with time zone, event jsonb)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- The worker's ten-minute sweep for sessions written into an approved leave after its approval
-- (a new course, a make-up): kc_cover_leaves as the owner.
CREATE OR REPLACE FUNCTION public.cover_leaves(p_limit integer DEFAULT 200)
 RETURNS integer
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$ SELECT kc_cover_leaves(p_limit) $function$

-- An operator forgets a consumer (one that is gone holds back the pruning of events).
CREATE OR REPLACE FUNCTION public.drop_event_consumer(p_consumer text)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    PERFORM kc_check_consumer(p_consumer);
    DELETE FROM business_event_consumers WHERE consumer = p_consumer;
    RETURN FOUND;
END
$function$

-- For a change that moves a session: SESSION_RESCHEDULED and the student's notification, given
-- where the session was; returns the event's id.
CREATE OR REPLACE FUNCTION public.emit_session_rescheduled(p_session uuid, p_old_date date, p_old_time time without time zone)
 RETURNS uuid
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- For a change that gives a session to a substitute trainer: SESSION_SUBSTITUTED and the
-- student's notification; returns the event's id.
CREATE OR REPLACE FUNCTION public.emit_session_substituted(p_session uuid, p_original_trainer uuid)
 RETURNS uuid
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- Ends a live allocation with a reason: cancelled, its future sessions cancelled (started ones
-- stay); returns how many sessions were cancelled.
CREATE OR REPLACE FUNCTION public.end_allocation(p_allocation uuid, p_reason text, p_detail text)
 RETURNS integer
 LANGUAGE plpgsql
AS $function$
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
$function$

-- The only way to enqueue a stage for a row, in the transaction of the change that causes it:
-- one live job per (stage, row), its priority from kc_job_priority; a job already running gets
-- a follow-up (stage_followups).
CREATE OR REPLACE FUNCTION public.enqueue_stage(p_stage text, p_ref uuid, p_event text DEFAULT 'enqueued'::text, p_delay interval DEFAULT '00:00:00'::interval)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_key      text := p_stage || ':' || p_ref;
    v_job_id   bigint;
    v_running  boolean;
    v_priority integer;
BEGIN
    IF p_stage IS NULL OR p_stage NOT IN ('purchase', 'allocation', 'sessions') THEN
        RAISE EXCEPTION 'unknown stage %', p_stage
            USING HINT = 'stages are purchase, allocation and sessions',
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_ref IS NULL THEN
        RAISE EXCEPTION 'enqueue_stage(%): the row id is NULL', p_stage
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_event IS NULL OR p_event NOT IN ('enqueued', 'replayed', 'healed') THEN
        RAISE EXCEPTION 'enqueue_stage(%): % is not an enqueue event', p_stage, p_event
            USING HINT = 'events are enqueued, replayed and healed',
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_delay IS NULL OR p_delay < interval '0' OR p_delay > interval '1 day' THEN
        RAISE EXCEPTION 'enqueue_stage(%): a delay of % is outside 0 .. 1 day', p_stage, p_delay
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT (CASE p_stage
        WHEN 'purchase' THEN EXISTS (SELECT 1 FROM payments WHERE id = p_ref)
        WHEN 'allocation' THEN EXISTS (SELECT 1 FROM student_course_purchases WHERE id = p_ref)
        ELSE EXISTS (SELECT 1 FROM trainer_allocations WHERE id = p_ref) END)
    THEN
        RAISE EXCEPTION 'enqueue_stage(%): no row %', p_stage, p_ref
            USING HINT = 'purchase takes a payment id, allocation a purchase id, '
                         'sessions an allocation id',
                  ERRCODE = 'no_data_found';
    END IF;
    v_priority := kc_job_priority(p_stage, p_ref, p_event);

    INSERT INTO pgqueuer (priority, entrypoint, payload, execute_after, dedupe_key, status)
    VALUES (v_priority, p_stage, convert_to(p_ref::text, 'UTF8'), now() + p_delay, v_key,
            'queued')
    ON CONFLICT (dedupe_key)
        WHERE status IN ('queued', 'picked') AND dedupe_key IS NOT NULL
        DO NOTHING
    RETURNING id INTO v_job_id;

    IF v_job_id IS NOT NULL THEN
        INSERT INTO pgqueuer_log (job_id, status, entrypoint, priority)
        VALUES (v_job_id, 'queued', p_stage, v_priority);
        INSERT INTO stage_history (stage, ref_id, event, job_id)
        VALUES (p_stage, p_ref, p_event, v_job_id);
        RETURN v_job_id;
    END IF;

    -- Absorbed by the job that exists: it does what was asked, sooner when asked for more.
    SELECT id, status = 'picked' INTO v_job_id, v_running FROM pgqueuer
    WHERE dedupe_key = v_key AND status IN ('queued', 'picked');
    IF v_running THEN
        -- A running job may have read the row before this change: run the stage once more
        -- after it (trg_pgqueuer_followups enqueues it when the running job is gone).
        INSERT INTO stage_followups (stage, ref_id) VALUES (p_stage, p_ref)
        ON CONFLICT DO NOTHING;
    ELSE
        UPDATE pgqueuer SET priority = v_priority
        WHERE id = v_job_id AND status = 'queued' AND priority < v_priority;
    END IF;
    IF p_event = 'replayed' THEN  -- an operator's act is history, with its actor
        INSERT INTO stage_history (stage, ref_id, event, job_id)
        VALUES (p_stage, p_ref, p_event, v_job_id);
    END IF;
    RETURN v_job_id;
END
$function$

-- Business events after a position, in commit order (the committed ones, numbered first); for a
-- reader that keeps its own position.
CREATE OR REPLACE FUNCTION public.events_after(p_position bigint, p_limit integer DEFAULT 500)
 RETURNS TABLE(pos bigint, event_id uuid, type text, purchase_id uuid, occurred_at timestamp with time zone, event jsonb)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

CREATE OR REPLACE FUNCTION public.fn_pgqueuer_changed()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
    to_emit BOOLEAN := false;  -- Flag to decide whether to emit a notification
BEGIN
    -- Check operation type and set the emit flag accordingly
    IF TG_OP = 'UPDATE' AND OLD IS DISTINCT FROM NEW THEN
        to_emit := true;
    ELSIF TG_OP = 'DELETE' THEN
        to_emit := true;
    ELSIF TG_OP = 'INSERT' THEN
        to_emit := true;
    ELSIF TG_OP = 'TRUNCATE' THEN
        to_emit := true;
    END IF;

    -- Perform notification if the emit flag is set
    IF to_emit THEN
        PERFORM pg_notify(
            'ch_pgqueuer',
            json_build_object(
                'channel', 'ch_pgqueuer',
                'operation', lower(TG_OP),
                'sent_at', NOW(),
                'table', TG_TABLE_NAME,
                'type', 'table_changed_event'
            )::text
        );
    END IF;

    -- Return appropriate value based on the operation
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        RETURN NEW;
    ELSIF TG_OP = 'DELETE' THEN
        RETURN OLD;
    ELSE
        RETURN NULL; -- For TRUNCATE and other non-row-specific contexts
    END IF;

END;
$function$

-- The healer: rows older than p_min_age whose next stage has no job (a lost enqueue) are
-- enqueued again and recorded as healed.
CREATE OR REPLACE FUNCTION public.heal_pipeline(p_min_age interval DEFAULT '00:02:00'::interval)
 RETURNS TABLE(stage text, ref_id uuid)
 LANGUAGE sql
AS $function$
    WITH held AS (
        SELECT entrypoint AS stage, kc_job_ref(entrypoint, dedupe_key) AS ref_id
        FROM pgqueuer WHERE kc_job_ref(entrypoint, dedupe_key) IS NOT NULL
    ), missing AS (
        -- a succeeded payment with no purchase, no open rejection and no upgrade record
        SELECT 'purchase' AS stage, p.id AS ref_id
        FROM payments p
        WHERE p.status = 'succeeded' AND p.updated_at < now() - p_min_age
          AND NOT EXISTS (SELECT 1 FROM student_course_purchases pu WHERE pu.payment_id = p.id)
          AND NOT EXISTS (SELECT 1 FROM purchase_upgrades u WHERE u.payment_id = p.id)
          AND NOT EXISTS (SELECT 1 FROM payment_rejections r
                          WHERE r.payment_id = p.id AND r.resolved_at IS NULL)
        UNION ALL
        -- an active purchase with no live allocation, or approved but short of sessions
        SELECT 'allocation', pu.id
        FROM student_course_purchases pu
        WHERE pu.is_active AND pu.created_at < now() - p_min_age
          AND (NOT EXISTS (SELECT 1 FROM trainer_allocations ta
                           WHERE ta.purchase_id = pu.id AND ta.status IN ('pending', 'approved'))
               OR EXISTS (SELECT 1 FROM trainer_allocations ta
                          WHERE ta.purchase_id = pu.id AND ta.status = 'approved'
                            AND ta.allocated_at < now() - p_min_age
                            AND EXISTS (SELECT 1 FROM tutoring_sessions ts
                                        WHERE ts.allocation_id = ta.id)
                            AND (SELECT count(*) FROM tutoring_sessions ts
                                 JOIN trainer_allocations a2 ON a2.id = ts.allocation_id
                                 WHERE a2.purchase_id = pu.id AND ts.status <> 'cancelled')
                                < pu.purchase_tier))
        UNION ALL
        -- an approved allocation without any session
        SELECT 'sessions', ta.id
        FROM trainer_allocations ta
        WHERE ta.status = 'approved' AND ta.allocated_at < now() - p_min_age
          AND NOT EXISTS (SELECT 1 FROM tutoring_sessions ts WHERE ts.allocation_id = ta.id)
    )
    , todo AS MATERIALIZED (
        SELECT m.stage, m.ref_id
        FROM missing m
        WHERE NOT EXISTS (SELECT 1 FROM held h WHERE h.stage = m.stage AND h.ref_id = m.ref_id)
    )
    SELECT t.stage, t.ref_id
    FROM todo t
    CROSS JOIN LATERAL (SELECT enqueue_stage(t.stage, t.ref_id, 'healed')) AS enqueued
$function$

-- The business events of allocations that changed (trainer allocated, student deallocated,
-- admin override, notifications), from the rows and their statuses before.
CREATE OR REPLACE FUNCTION public.kc_allocation_events(p_ids uuid[], p_old_status text[])
 RETURNS integer
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
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
$function$

-- apply_refund's work, without the check that the payment is refunded (for callers that have
-- checked).
CREATE OR REPLACE FUNCTION public.kc_apply_refund_unchecked(p_payment uuid)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_purchase uuid;
    v_upgrade  purchase_upgrades%ROWTYPE;
    v_detail   text;
BEGIN
    SELECT id INTO v_purchase FROM student_course_purchases
    WHERE payment_id = p_payment AND is_active FOR UPDATE;
    IF FOUND THEN
        UPDATE student_course_purchases SET is_active = false, deactivated_at = now()
        WHERE id = v_purchase;
        UPDATE trainer_allocations
        SET status = 'cancelled', reason = 'refunded', updated_at = now(),
            reason_detail = 'the payment was refunded'
        WHERE purchase_id = v_purchase AND status IN ('pending', 'approved');
        UPDATE tutoring_sessions ts SET status = 'cancelled', cancelled_at = now()
        FROM trainer_allocations ta
        WHERE ta.id = ts.allocation_id AND ta.purchase_id = v_purchase
          AND ts.status = 'scheduled' AND ts.starts_at > now();
        UPDATE allocation_requests SET status = 'refused', outcome = 'the payment was refunded',
                                       decided_at = now()
        WHERE purchase_id = v_purchase AND status = 'open';
        v_detail := 'purchase ' || v_purchase || ' deactivated';
    ELSE
        SELECT * INTO v_upgrade FROM purchase_upgrades
        WHERE payment_id = p_payment AND reverted_at IS NULL FOR UPDATE;
        IF NOT FOUND THEN
            v_detail := 'nothing to undo: no active purchase or upgrade for this payment';
        ELSE
            UPDATE purchase_upgrades SET reverted_at = now() WHERE payment_id = p_payment;
            UPDATE student_course_purchases
            SET purchase_tier = purchase_tier - (v_upgrade.to_tier - v_upgrade.from_tier)
            WHERE id = v_upgrade.purchase_id;
            UPDATE tutoring_sessions ts SET status = 'cancelled', cancelled_at = now()
            FROM trainer_allocations ta
            WHERE ta.id = ts.allocation_id AND ta.purchase_id = v_upgrade.purchase_id
              AND ts.status = 'scheduled' AND ts.starts_at > now()
              AND ts.session_number > (SELECT purchase_tier FROM student_course_purchases
                                       WHERE id = v_upgrade.purchase_id);
            v_detail := 'upgrade of purchase ' || v_upgrade.purchase_id || ' reverted to '
                        || v_upgrade.from_tier || ' sessions';
        END IF;
    END IF;
    INSERT INTO stage_history (stage, ref_id, event, detail)
    VALUES ('purchase', p_payment, 'refunded', v_detail);
    RETURN v_detail;
END
$function$

-- approve_leave's work, in the substitutions' lock order.
CREATE OR REPLACE FUNCTION public.kc_approve_leave(p_leave bigint, p_handover_days integer, p_actor text)
 RETURNS SETOF kc_leave_change
 LANGUAGE plpgsql
AS $function$
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
$function$

-- approve_session_move's work: locks in the allocation stage's order (request, purchase, one
-- trainer at a time), re-checks the move, places the session or raises with the rule.
CREATE OR REPLACE FUNCTION public.kc_approve_move(p_request uuid, p_substitute boolean, p_reviewer text)
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- assign_trainer's work: checks the purchase and trainer, supersedes open requests, records the
-- request and enqueues the allocation stage.
CREATE OR REPLACE FUNCTION public.kc_assign_trainer(p_purchase uuid, p_trainer uuid, p_override boolean DEFAULT false, p_note text DEFAULT NULL::text)
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_request    bigint;
    v_superseded bigint[];
BEGIN
    -- The purchase's lock orders this request after an allocation job in flight for it.
    PERFORM 1 FROM student_course_purchases WHERE id = p_purchase AND is_active FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no active purchase %', p_purchase USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM trainers WHERE id = p_trainer) THEN
        RAISE EXCEPTION 'no trainer %', p_trainer USING ERRCODE = 'no_data_found';
    END IF;
    IF p_override IS NULL THEN
        RAISE EXCEPTION 'override must be true or false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_override AND nullif(btrim(p_note), '') IS NULL THEN
        RAISE EXCEPTION 'an override needs a note saying why'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH closed AS (
        UPDATE allocation_requests SET status = 'superseded', decided_at = now()
        WHERE purchase_id = p_purchase AND status = 'open'
        RETURNING id
    )
    SELECT array_agg(id) INTO v_superseded FROM closed;
    INSERT INTO allocation_requests (purchase_id, trainer_id, override, note)
    VALUES (p_purchase, p_trainer, p_override, p_note)
    RETURNING id INTO v_request;
    UPDATE allocation_requests SET outcome = 'superseded by request ' || v_request
    WHERE id = ANY (v_superseded);
    PERFORM enqueue_stage('allocation', p_purchase);
    RETURN v_request;
END
$function$

-- Records who the running operator function acts for (kc_acting) and sets kc.acting = 'on'
-- until kc_end_acting.
CREATE OR REPLACE FUNCTION public.kc_begin_acting(p_actor text)
 RETURNS text
 LANGUAGE sql
AS $function$
    INSERT INTO kc_acting (pid, actor, previous_setting)
    VALUES (pg_backend_pid(), p_actor, current_setting('kc.acting', true));
    SELECT set_config('kc.acting', 'on', true);
    SELECT p_actor;
$function$

-- The best trainer other than the session's own who fits that one session at that local date
-- and time (kc_session_fit, p_full), ranked as the matching ranks; NULL when nobody does.
CREATE OR REPLACE FUNCTION public.kc_best_substitute(p_session_id uuid, p_date date, p_start time without time zone)
 RETURNS uuid
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- cancel_leave's work, in the substitutions' lock order.
CREATE OR REPLACE FUNCTION public.kc_cancel_leave(p_leave bigint, p_actor text)
 RETURNS SETOF kc_leave_change
 LANGUAGE plpgsql
AS $function$
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
$function$

-- Refuses a business event consumer's name that is not 1 to 63 of a-z, 0-9, _ . : -.
CREATE OR REPLACE FUNCTION public.kc_check_consumer(p_consumer text)
 RETURNS void
 LANGUAGE plpgsql
 IMMUTABLE
AS $function$
BEGIN
    IF p_consumer IS NULL OR p_consumer !~ '^[a-z0-9][a-z0-9_.:-]{0,62}$' THEN
        RAISE EXCEPTION 'a consumer''s name is 1 to 63 of a-z, 0-9, _ . : - (starting with a '
                        'letter or digit), not %', quote_nullable(left(p_consumer, 80))
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$function$

-- What a move may not do, at the request and again at approval: the session scheduled and not
-- started, its purchase live, the new time in the future beyond the cut-off, no holiday, ending
-- by midnight. Raises with a sentence, or returns the session's facts.
CREATE OR REPLACE FUNCTION public.kc_check_move(p_session_id uuid, p_date date, p_time time without time zone, OUT session_id uuid, OUT allocation_id uuid, OUT purchase_id uuid, OUT student_id uuid, OUT trainer_id uuid, OUT session_number integer, OUT old_date date, OUT old_time time without time zone, OUT old_starts timestamp with time zone, OUT new_starts timestamp with time zone, OUT new_ends timestamp with time zone, OUT timezone text, OUT learning_mode text)
 RETURNS record
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- For trainers who changed or lost availability: enqueues the allocation stage for each live
-- allocation they can no longer teach (unfit_allocations).
CREATE OR REPLACE FUNCTION public.kc_check_trainers(p_trainers uuid[])
 RETURNS integer
 LANGUAGE sql
AS $function$
    SELECT count(kc_enqueue_allocation(u.purchase_id, 'trainer_changed',
                                       'trainer ' || u.trainer_id || ': ' || u.detail))::integer
    FROM unfit_allocations u
    WHERE u.trainer_id = ANY (p_trainers)
$function$

-- A time of day as the app writes a time slot: 5:00 PM.
CREATE OR REPLACE FUNCTION public.kc_clock(p_time time without time zone)
 RETURNS text
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT to_char(date '2000-01-01' + p_time, 'FMHH12:MI AM') $function$

-- The operator a live console session belongs to (no row: unknown, signed out, expired, or
-- revoked).
CREATE OR REPLACE FUNCTION public.kc_console_operator(p_session text)
 RETURNS TABLE(operator text, expires_at timestamp with time zone)
 LANGUAGE sql
 STABLE
AS $function$
    SELECT o.name, s.expires_at
    FROM console_sessions s
    JOIN console_operators o ON o.id = s.operator_id
    WHERE s.id_hash = sha256(convert_to(p_session, 'UTF8'))
      AND length(p_session) <= 200
      AND s.ended_at IS NULL AND s.expires_at > now() AND o.revoked_at IS NULL
$function$

-- Covers up to p_limit scheduled sessions ahead whose trainer is on approved leave that day
-- (not those of a course a long leave hands over): the substitutions lock, the purchases in id
-- order, then kc_cover_session each. Returns how many.
CREATE OR REPLACE FUNCTION public.kc_cover_leaves(p_limit integer)
 RETURNS integer
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_due   uuid[];
    v_s     record;
    v_done  integer := 0;
BEGIN
    SELECT array_agg(d.id ORDER BY d.starts_at, d.id) INTO v_due
    FROM (SELECT ts.id, ts.starts_at
          FROM tutoring_sessions ts
          JOIN trainer_leaves l
            ON l.trainer_id = ts.trainer_id AND l.status = 'approved'
           AND ts.scheduled_date BETWEEN l.first_day AND l.last_day
          JOIN trainer_allocations ta ON ta.id = ts.allocation_id
          WHERE ts.status = 'scheduled' AND ts.starts_at > now()
            AND l.last_day >= kc_leave_today()
            AND NOT (l.handed_over AND ta.trainer_id = ts.trainer_id)
          ORDER BY ts.starts_at, ts.id
          LIMIT p_limit) d;
    IF v_due IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM kc_lock_substitutions();
    PERFORM kc_lock_sessions(v_due);
    FOR v_s IN
        SELECT ts.id, l.id AS leave_id, l.trainer_id
        FROM unnest(v_due) WITH ORDINALITY AS u(id, n)
        JOIN tutoring_sessions ts ON ts.id = u.id
        JOIN trainer_leaves l
          ON l.trainer_id = ts.trainer_id AND l.status = 'approved'
         AND ts.scheduled_date BETWEEN l.first_day AND l.last_day
        WHERE ts.status = 'scheduled' AND ts.starts_at > now()
        ORDER BY u.n
    LOOP
        PERFORM kc_cover_session(v_s.id, v_s.leave_id, v_s.trainer_id);
        v_done := v_done + 1;
    END LOOP;
    RETURN v_done;
END
$function$

-- One session (locked by the caller) of a trainer on leave: the best substitute who fits it, or
-- cancelled with cancel_reason (its make-up follows); a history line (substituted, or leave)
-- either way. Returns what it did.
CREATE OR REPLACE FUNCTION public.kc_cover_session(p_session_id uuid, p_leave bigint, p_trainer uuid)
 RETURNS kc_leave_change
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_row kc_leave_change;
    v_sub record;
BEGIN
    SELECT ts.id, ts.student_id, ts.scheduled_date, ts.scheduled_time, NULL, ts.trainer_id, NULL
    INTO v_row FROM tutoring_sessions ts WHERE ts.id = p_session_id;
    v_sub := kc_substitute_one(p_session_id, NULL, p_leave);
    IF v_sub.substitute IS NOT NULL THEN
        v_row.outcome := 'substituted';
        v_row.trainer_id := v_sub.substitute;
        v_row.detail := format('%s in place of %s', kc_trainer_label(v_sub.substitute),
                               kc_trainer_label(p_trainer));
        PERFORM kc_session_history(p_session_id, 'substituted',
                                   format('%s, leave %s', v_row.detail, p_leave));
    ELSE
        v_row.outcome := 'cancelled';
        v_row.detail := format('nobody can take it during %s''s leave %s: %s',
                               kc_trainer_label(p_trainer), p_leave, v_sub.why);
        -- Recorded before the cancellation, whose make-up line follows it.
        PERFORM kc_session_history(p_session_id, 'leave', 'cancelled, ' || v_row.detail);
        UPDATE tutoring_sessions
        SET status = 'cancelled', cancel_reason = v_row.detail, substitution_leave_id = p_leave
        WHERE id = p_session_id;
    END IF;
    RETURN v_row;
END
$function$

-- Ends kc_begin_acting: forgets the actor and puts kc.acting back.
CREATE OR REPLACE FUNCTION public.kc_end_acting()
 RETURNS void
 LANGUAGE sql
AS $function$
    WITH ended AS (DELETE FROM kc_acting WHERE pid = pg_backend_pid() RETURNING previous_setting)
    SELECT set_config('kc.acting', coalesce((SELECT previous_setting FROM ended), ''), true);
$function$

-- Enqueues the allocation stage for a purchase and records why in stage_history first.
CREATE OR REPLACE FUNCTION public.kc_enqueue_allocation(p_purchase uuid, p_event text, p_detail text)
 RETURNS bigint
 LANGUAGE plpgsql
AS $function$
BEGIN
    INSERT INTO stage_history (stage, ref_id, event, detail)
    VALUES ('allocation', p_purchase, p_event, p_detail);
    RETURN enqueue_stage('allocation', p_purchase);
END
$function$

-- Milliseconds since the epoch (the app's timestamp).
CREATE OR REPLACE FUNCTION public.kc_epoch_ms(p_at timestamp with time zone)
 RETURNS bigint
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT floor(extract(epoch FROM p_at) * 1000)::bigint $function$

-- The common shape of a business event (type, eventId from its key, timestamp, userId, role,
-- metadata) with the type's own fields.
CREATE OR REPLACE FUNCTION public.kc_event(p_type text, p_key text, p_at timestamp with time zone, p_user text, p_role text, p_metadata jsonb, p_fields jsonb)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT jsonb_build_object('type', p_type, 'eventId', kc_event_id(p_type || ':' || p_key),
                                'timestamp', kc_epoch_ms(p_at), 'userId', p_user,
                                'role', p_role, 'metadata', p_metadata) || p_fields $function$

-- Builds ADMIN_OVERRIDE: an admin's assignment of a trainer, with what changed and why.
CREATE OR REPLACE FUNCTION public.kc_event_admin_override(p_allocation uuid, p_admin text, p_action text, p_changes jsonb, p_reason text, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('ADMIN_OVERRIDE', p_allocation::text, p_at, p_admin, 'admin',
                      p_metadata, jsonb_build_object(
                          'action', p_action, 'targetId', p_allocation,
                          'targetType', 'allocation', 'changes', p_changes,
                          'reason', p_reason)) $function$

-- Builds COURSE_ACCESS_GRANTED for a new purchase.
CREATE OR REPLACE FUNCTION public.kc_event_course_access_granted(p_purchase uuid, p_student uuid, p_course uuid, p_tier integer, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('COURSE_ACCESS_GRANTED', p_purchase::text, p_at, p_student::text,
                      'student', p_metadata, jsonb_build_object(
                          'purchaseId', p_purchase, 'studentId', p_student,
                          'courseId', p_course, 'purchaseTier', p_tier)) $function$

-- Builds COURSE_COMPLETED: every owed session delivered.
CREATE OR REPLACE FUNCTION public.kc_event_course_completed(p_purchase uuid, p_student uuid, p_course uuid, p_day date, p_total integer, p_completed integer, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('COURSE_COMPLETED', p_purchase::text, p_at, p_student::text, 'student',
                      p_metadata, jsonb_build_object(
                          'courseId', p_course, 'studentId', p_student,
                          'completionDate', p_day::text, 'totalSessions', p_total,
                          'completedSessions', p_completed)) $function$

-- Builds COURSE_PROGRESS_UPDATED: sessions delivered of those owed.
CREATE OR REPLACE FUNCTION public.kc_event_course_progress_updated(p_purchase uuid, p_student uuid, p_course uuid, p_completed integer, p_total integer, p_last timestamp with time zone, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('COURSE_PROGRESS_UPDATED', p_purchase || ':' || p_completed, p_at,
                      p_student::text, 'student', p_metadata, jsonb_build_object(
                          'studentId', p_student, 'courseId', p_course,
                          'completedSessions', p_completed, 'totalSessions', p_total,
                          'percentage', least(100, floor(100.0 * p_completed
                                                         / greatest(p_total, 1)))::integer,
                          'lastCompletedAt', kc_iso(p_last))) $function$

-- A stable UUID (version 8) from the SHA-256 of an event's key: the same change always gets the
-- same id.
CREATE OR REPLACE FUNCTION public.kc_event_id(p_key text)
 RETURNS uuid
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT overlay(overlay(substr(encode(sha256(convert_to('koding-caravan:' || p_key, 'UTF8')),
                                           'hex'), 1, 32)
                             placing '8' from 13 for 1) placing '8' from 17 for 1)::uuid $function$

-- Builds a NOTIFICATION for the student or trainer; p_key names what it is about, so one change
-- never notifies twice.
CREATE OR REPLACE FUNCTION public.kc_event_notification(p_key text, p_user uuid, p_role text, p_kind text, p_title text, p_body text, p_data jsonb, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('NOTIFICATION_REQUESTED', p_role || ':' || p_key, p_at, p_user::text,
                      p_role, p_metadata, jsonb_build_object(
                          'notificationType', p_kind, 'title', p_title, 'body', p_body,
                          'data', p_data)) $function$

-- Builds PURCHASE_CREATED with the payment's metadata as the app sent it.
CREATE OR REPLACE FUNCTION public.kc_event_purchase_created(p_purchase uuid, p_student uuid, p_course uuid, p_tier integer, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('PURCHASE_CREATED', p_purchase::text, p_at, p_student::text, 'student',
                      p_metadata, jsonb_build_object(
                          'purchaseId', p_purchase, 'studentId', p_student,
                          'courseId', p_course, 'purchaseTier', p_tier)) $function$

-- Builds SESSION_COMPLETED.
CREATE OR REPLACE FUNCTION public.kc_event_session_completed(p_session uuid, p_trainer uuid, p_student uuid, p_course uuid, p_completed_at timestamp with time zone, p_minutes integer, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('SESSION_COMPLETED', p_session::text, p_at, p_student::text, 'student',
                      p_metadata, jsonb_build_object(
                          'sessionId', p_session, 'trainerId', p_trainer,
                          'studentId', p_student, 'courseId', p_course,
                          'completedAt', kc_iso(p_completed_at), 'duration', p_minutes)) $function$

-- Builds SESSION_RESCHEDULED: a session's old and new date and time.
CREATE OR REPLACE FUNCTION public.kc_event_session_rescheduled(p_session uuid, p_old_date date, p_new_date date, p_old_time time without time zone, p_new_time time without time zone, p_trainer uuid, p_student uuid, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('SESSION_RESCHEDULED',
                      concat_ws(':', p_session, p_old_date, p_old_time, p_new_date, p_new_time),
                      p_at, p_student::text, 'student', p_metadata, jsonb_build_object(
                          'sessionId', p_session, 'oldDate', p_old_date::text,
                          'newDate', p_new_date::text, 'oldTimeSlot', kc_clock(p_old_time),
                          'newTimeSlot', kc_clock(p_new_time), 'trainerId', p_trainer,
                          'studentId', p_student)) $function$

-- Builds SESSION_SUBSTITUTED: a session given to another trainer.
CREATE OR REPLACE FUNCTION public.kc_event_session_substituted(p_session uuid, p_original uuid, p_substitute uuid, p_student uuid, p_day date, p_time time without time zone, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('SESSION_SUBSTITUTED',
                      concat_ws(':', p_session, p_original, p_substitute, p_day, p_time),
                      p_at, p_student::text, 'student', p_metadata, jsonb_build_object(
                          'sessionId', p_session, 'originalTrainerId', p_original,
                          'substituteTrainerId', p_substitute, 'studentId', p_student,
                          'date', p_day::text, 'timeSlot', kc_clock(p_time))) $function$

-- Builds SESSIONS_GENERATED: the sessions an allocation got in one statement.
CREATE OR REPLACE FUNCTION public.kc_event_sessions_generated(p_allocation uuid, p_trainer uuid, p_student uuid, p_course uuid, p_sessions uuid[], p_start date, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('SESSIONS_GENERATED', p_allocation || ':' || p_sessions[1], p_at,
                      p_student::text, 'student', p_metadata, jsonb_build_object(
                          'allocationId', p_allocation, 'trainerId', p_trainer,
                          'studentId', p_student, 'courseId', p_course,
                          'sessionCount', cardinality(p_sessions),
                          'sessionIds', to_jsonb(p_sessions), 'startDate', p_start::text)) $function$

-- Builds STUDENT_DEALLOCATED: an allocation ended, with the reason.
CREATE OR REPLACE FUNCTION public.kc_event_student_deallocated(p_allocation uuid, p_trainer uuid, p_student uuid, p_course uuid, p_reason text, p_at_instant timestamp with time zone, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('STUDENT_DEALLOCATED', p_allocation::text, p_at, p_trainer::text,
                      'trainer', p_metadata, jsonb_build_object(
                          'allocationId', p_allocation, 'trainerId', p_trainer,
                          'studentId', p_student, 'courseId', p_course, 'reason', p_reason,
                          'deallocatedAt', kc_iso(p_at_instant))) $function$

-- Builds TRAINER_ALLOCATED: a purchase's trainer approved.
CREATE OR REPLACE FUNCTION public.kc_event_trainer_allocated(p_allocation uuid, p_trainer uuid, p_student uuid, p_course uuid, p_sessions integer, p_start date, p_end date, p_metadata jsonb, p_at timestamp with time zone)
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT kc_event('TRAINER_ALLOCATED', p_allocation::text, p_at, p_student::text,
                      'student', p_metadata, jsonb_build_object(
                          'allocationId', p_allocation, 'trainerId', p_trainer,
                          'studentId', p_student, 'courseId', p_course,
                          'sessionCount', p_sessions, 'startDate', p_start::text,
                          'endDate', p_end::text)) $function$

-- Great-circle distance in km between two points: the one home of distance (service radius,
-- travel between sessions); no Python copy.
CREATE OR REPLACE FUNCTION public.kc_haversine_km(lat1 double precision, lng1 double precision, lat2 double precision, lng2 double precision)
 RETURNS double precision
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$ SELECT 2 * 6371.0 * asin(sqrt(
        (sin(radians(lat2 - lat1) / 2) ^ 2
         + cos(radians(lat1)) * cos(radians(lat2)) * sin(radians(lng2 - lng1) / 2) ^ 2)
      - greatest(sin(radians(lat2 - lat1) / 2) ^ 2
                 + cos(radians(lat1)) * cos(radians(lat2)) * sin(radians(lng2 - lng1) / 2) ^ 2
                 - 1.0, 0))) $function$

-- An instant as JavaScript's toISOString() writes it: 2026-11-23T11:30:00.000Z.
CREATE OR REPLACE FUNCTION public.kc_iso(p_at timestamp with time zone)
 RETURNS text
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $function$

-- A job's priority for its stage and row: later stages first; a purchase that waits for a
-- trainer and is tried again last.
CREATE OR REPLACE FUNCTION public.kc_job_priority(p_stage text, p_ref uuid, p_event text)
 RETURNS integer
 LANGUAGE sql
 STABLE
AS $function$
    SELECT CASE
        WHEN p_stage = 'sessions' THEN 30
        WHEN p_stage = 'purchase' THEN 10
        WHEN p_event = 'enqueued'
             AND EXISTS (SELECT 1 FROM trainer_allocations ta
                         WHERE ta.purchase_id = p_ref AND ta.status = 'pending')
             AND NOT EXISTS (SELECT 1 FROM allocation_requests r
                             WHERE r.purchase_id = p_ref AND r.status = 'open')
             AND NOT EXISTS (SELECT 1 FROM schedule_changes sc
                             WHERE sc.purchase_id = p_ref AND sc.status = 'open')
        THEN 0
        ELSE 20
    END
$function$

-- The row of one of the pipeline's jobs ('<stage>:<uuid>'), NULL for anything else in
-- pgqueuer's table (another application's job must not break the views or the healer).
CREATE OR REPLACE FUNCTION public.kc_job_ref(p_entrypoint text, p_dedupe_key text)
 RETURNS uuid
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
    SELECT CASE
        WHEN p_entrypoint IN ('purchase', 'allocation', 'sessions')
         AND p_dedupe_key ~ ('^' || p_entrypoint
                             || ':[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$')
        THEN substr(p_dedupe_key, length(p_entrypoint) + 2)::uuid
    END
$function$

-- The latest start date accepted on a day: a year ahead, 28 February for 29 February, at most
-- 9999-12-31. The SQL half of metadata.latest_start (tests/test_rule_pairs.py).
CREATE OR REPLACE FUNCTION public.kc_latest_start(p_today date)
 RETURNS date
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
AS $function$ SELECT least((p_today + interval '1 year')::date, date '9999-12-31') $function$

-- The first date of a leave still ahead somewhere (today where the day began last, UTC-12): a
-- leave whose last day is before it has ended everywhere.
CREATE OR REPLACE FUNCTION public.kc_leave_today()
 RETURNS date
 LANGUAGE sql
 STABLE
AS $function$ SELECT (now() AT TIME ZONE 'Etc/GMT+12')::date $function$

-- Closes the database to every login but the project's roles (PUBLIC keeps CONNECT and
-- TEMPORARY on a new database); run by the migrations and on each test copy.
CREATE OR REPLACE FUNCTION public.kc_limit_database_access()
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- Remembers, transaction-locally (a rolled-back savepoint forgets), the trainers whose approved
-- allocations a statement changed, for trainer_load to settle at commit.
CREATE OR REPLACE FUNCTION public.kc_load_touch(p_trainers uuid[])
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    IF cardinality(p_trainers) = 0 THEN
        RETURN;
    END IF;
    PERFORM set_config(
        'kc.load_touched',
        array_to_string(ARRAY(
            SELECT DISTINCT t
            FROM unnest(string_to_array(nullif(current_setting('kc.load_touched', true), ''),
                                        ',')
                        || p_trainers::text[]) t
            WHERE t IS NOT NULL), ','),
        true);
END
$function$

-- Locks the purchases of these sessions in id order (the allocation stage's first lock), then
-- the sessions.
CREATE OR REPLACE FUNCTION public.kc_lock_sessions(p_sessions uuid[])
 RETURNS void
 LANGUAGE plpgsql
AS $function$
BEGIN
    PERFORM 1 FROM student_course_purchases pu
    WHERE pu.id IN (SELECT ta.purchase_id FROM tutoring_sessions ts
                    JOIN trainer_allocations ta ON ta.id = ts.allocation_id
                    WHERE ts.id = ANY (p_sessions))
    ORDER BY pu.id FOR UPDATE OF pu;
    PERFORM 1 FROM tutoring_sessions WHERE id = ANY (p_sessions) ORDER BY id FOR UPDATE;
END
$function$

-- One substituting transaction at a time: only substitutions hold one trainer's lock while
-- waiting for another's, so they take turns and no cycle forms.
CREATE OR REPLACE FUNCTION public.kc_lock_substitutions()
 RETURNS void
 LANGUAGE sql
AS $function$ SELECT pg_advisory_xact_lock(hashtextextended('kc-substitutions', 0)) $function$

-- The transaction-scoped lock of one trainer: approvals for a trainer are serialised without a
-- row lock (the allocation stage and the capacity trigger take it).
CREATE OR REPLACE FUNCTION public.kc_lock_trainer(p_trainer uuid)
 RETURNS void
 LANGUAGE sql
AS $function$ SELECT pg_advisory_xact_lock(hashtextextended('kc-trainer:' || p_trainer::text, 0)) $function$

-- Serialises the leave requests of one trainer (transaction advisory lock), so the overlap
-- check and the insert are not raced.
CREATE OR REPLACE FUNCTION public.kc_lock_trainer_leaves(p_trainer uuid)
 RETURNS void
 LANGUAGE sql
AS $function$ SELECT pg_advisory_xact_lock(hashtextextended('kc-leave:' || p_trainer::text, 0)) $function$

-- A day as the app's notifications write it: Monday, November 23, 2026.
CREATE OR REPLACE FUNCTION public.kc_long_date(p_day date)
 RETURNS text
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT to_char(p_day, 'FMDay, FMMonth FMDD, YYYY') $function$

-- A lower-cased, trimmed copy of a text array: specialties match case-insensitively.
CREATE OR REPLACE FUNCTION public.kc_lower_array(items text[])
 RETURNS text[]
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
AS $function$ SELECT coalesce(array_agg(lower(btrim(item)) ORDER BY ord), '{}')
      FROM unnest(items) WITH ORDINALITY AS t(item, ord) WHERE item IS NOT NULL $function$

-- The schedule mode a word names (daily, weekdays, sunday_only), NULL for any other text: the
-- SQL half of metadata.MODE_WORDS, ASCII only (tests/test_rule_pairs.py).
CREATE OR REPLACE FUNCTION public.kc_mode_of(p_word text)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
AS $function$ SELECT CASE regexp_replace(translate(p_word, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                                                   'abcdefghijklmnopqrstuvwxyz'),
                                 '[ \t\n\r\f\v_-]+', '', 'g')
                 WHEN 'daily' THEN 'daily'
                 WHEN 'everyday' THEN 'daily'
                 WHEN 'weekdaydaily' THEN 'daily'
                 WHEN 'weekdays' THEN 'weekdays'
                 WHEN 'sundayonly' THEN 'sunday_only'
                 WHEN 'sunday' THEN 'sunday_only'
                 WHEN 'sundayfocus' THEN 'sunday_only' END
      WHERE length(p_word) <= 200 $function$

-- The ISO weekdays a schedule mode uses: the SQL half of schedule.allowed_weekdays
-- (tests/test_rule_pairs.py).
CREATE OR REPLACE FUNCTION public.kc_mode_weekdays(p_mode text)
 RETURNS smallint[]
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
AS $function$ SELECT CASE p_mode WHEN 'daily' THEN '{1,2,3,4,5,6,7}'::smallint[]
                         WHEN 'weekdays' THEN '{1,2,3,4,5}'::smallint[]
                         WHEN 'sunday_only' THEN '{7}'::smallint[] END $function$

-- Who an operator function acts for: the console session's operator, checked
-- ('console:<name>'); without a session the database login.
CREATE OR REPLACE FUNCTION public.kc_operator_actor(p_session text)
 RETURNS text
 LANGUAGE plpgsql
 STABLE
AS $function$
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
$function$

-- A clock time as the app writes it ('4:00 PM', '4 PM', '16:00'), or invalid_datetime_format
-- with the reason: the SQL half of metadata.parse_clock (tests/test_rule_pairs.py).
CREATE OR REPLACE FUNCTION public.kc_parse_clock(p_text text)
 RETURNS time without time zone
 LANGUAGE plpgsql
 IMMUTABLE STRICT
AS $function$
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
$function$

-- Puts a session at its new time (and trainer), then renumbers the standing sessions the move
-- passed in time order, each with the delivery its number gives (a hybrid course keeps its
-- pattern).
CREATE OR REPLACE FUNCTION public.kc_place_session(p_session_id uuid, p_date date, p_time time without time zone, p_trainer uuid)
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- The business events of new purchases: PURCHASE_CREATED and COURSE_ACCESS_GRANTED.
CREATE OR REPLACE FUNCTION public.kc_purchase_events(p_ids uuid[])
 RETURNS integer
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
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
$function$

-- Sets every trainer's live allocation count again from the allocations, after writes with
-- triggers off (the benchmark's seeding, a repair). The owner's.
CREATE OR REPLACE FUNCTION public.kc_recount_trainer_load()
 RETURNS bigint
 LANGUAGE sql
 SET search_path TO 'public', 'pg_temp'
AS $function$
    WITH counted AS (
        INSERT INTO trainer_load (trainer_id, live_allocations)
        SELECT t.id, (SELECT count(*) FROM trainer_allocations ta
                      WHERE ta.trainer_id = t.id AND ta.status = 'approved')
        FROM trainers t
        ORDER BY t.id
        ON CONFLICT (trainer_id) DO UPDATE SET live_allocations = EXCLUDED.live_allocations
        WHERE trainer_load.live_allocations IS DISTINCT FROM EXCLUDED.live_allocations
        RETURNING 1)
    SELECT count(*) FROM counted;
$function$

-- replay_stage's work: checks the stage and row, removes a failed job and enqueues the stage
-- again.
CREATE OR REPLACE FUNCTION public.kc_replay_stage(p_stage text, p_ref uuid)
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_failed bigint;
    v_exists boolean;
BEGIN
    IF p_stage IS NULL OR p_stage NOT IN ('purchase', 'allocation', 'sessions') THEN
        RAISE EXCEPTION 'unknown stage %', p_stage
            USING HINT = 'stages are purchase, allocation and sessions',
                  ERRCODE = 'invalid_parameter_value';
    END IF;
    v_exists := CASE p_stage
        WHEN 'purchase' THEN EXISTS (SELECT 1 FROM payments WHERE id = p_ref)
        WHEN 'allocation' THEN EXISTS (SELECT 1 FROM student_course_purchases WHERE id = p_ref)
        ELSE EXISTS (SELECT 1 FROM trainer_allocations WHERE id = p_ref) END;
    IF NOT v_exists THEN
        RAISE EXCEPTION 'no % row %: purchase takes a payment id, allocation a purchase id, '
                        'sessions an allocation id', p_stage, p_ref
            USING ERRCODE = 'no_data_found';
    END IF;
    DELETE FROM pgqueuer
    WHERE dedupe_key = p_stage || ':' || p_ref AND status = 'failed'
    RETURNING id INTO v_failed;
    IF v_failed IS NOT NULL THEN
        INSERT INTO pgqueuer_log (job_id, status, entrypoint, priority)
        VALUES (v_failed, 'deleted', p_stage, 0);
        DELETE FROM job_starts WHERE job_id = v_failed;
    END IF;
    -- A queued job waiting for a later time (a retry's backoff, or a job parked on purpose)
    -- runs now: the replay is what the operator asked for.
    UPDATE pgqueuer SET execute_after = now()
    WHERE dedupe_key = p_stage || ':' || p_ref AND status = 'queued' AND execute_after > now();
    RETURN enqueue_stage(p_stage, p_ref, 'replayed');
END
$function$

-- request_leave's work, under the trainer's leave lock.
CREATE OR REPLACE FUNCTION public.kc_request_leave(p_trainer uuid, p_first_day date, p_last_day date, p_reason text, p_actor text)
 RETURNS bigint
 LANGUAGE plpgsql
AS $function$
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
$function$

-- Refuses (invalid_parameter_value) a payment that is not refunded: apply_refund's check.
CREATE OR REPLACE FUNCTION public.kc_require_refunded(p_payment uuid)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_status text;
BEGIN
    SELECT status INTO v_status FROM payments WHERE id = p_payment;
    IF v_status IS DISTINCT FROM 'refunded' THEN
        RAISE EXCEPTION 'apply_refund(%): the payment is %, not refunded', p_payment,
            coalesce(v_status, 'missing')
            USING HINT = 'a refund takes effect when payments.status becomes refunded',
                  ERRCODE = 'invalid_parameter_value';
    END IF;
END
$function$

-- reschedule's work: checks the purchase and the new slot (kc_parse_clock, ends by midnight:
-- kc_slot_end), mode (kc_mode_of) and start (not past, kc_latest_start), changes the purchase,
-- records the request and enqueues the allocation stage.
CREATE OR REPLACE FUNCTION public.kc_reschedule(p_purchase uuid, p_time_slot text DEFAULT NULL::text, p_start_date date DEFAULT NULL::date, p_schedule_mode text DEFAULT NULL::text)
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- Enqueues once, in purchase order, every waiting purchase one of these trainers could teach
-- (NULL: every waiting purchase); returns how many.
CREATE OR REPLACE FUNCTION public.kc_retry_pending(p_trainers uuid[])
 RETURNS integer
 LANGUAGE sql
AS $function$
    SELECT count(enqueue_stage('allocation', due.purchase_id))::integer
    FROM (
        SELECT ta.purchase_id
        FROM trainer_allocations ta
        JOIN courses c ON c.id = ta.course_id
        WHERE ta.status = 'pending'
          AND NOT EXISTS (SELECT 1 FROM pgqueuer j
                          WHERE j.dedupe_key = 'allocation:' || ta.purchase_id
                            AND j.status = 'failed')
          AND (p_trainers IS NULL OR EXISTS (
                SELECT 1 FROM trainers t
                WHERE t.id = ANY (p_trainers) AND t.status = 'active'
                  AND t.specialties_norm && array_remove(
                        ARRAY[lower(btrim(c.category)), lower(btrim(c.subcategory))], NULL)))
        ORDER BY ta.purchase_id
    ) due
$function$

-- Numbers the business events committed since its last run, in commit order
-- (business_event_positions), one run at a time.
CREATE OR REPLACE FUNCTION public.kc_sequence_events()
 RETURNS integer
 LANGUAGE plpgsql
AS $function$
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
$function$

-- Where session number n of a course happens (home, or hybrid: 1-6 online then alternating):
-- the SQL half of schedule.delivery_for (tests/test_rule_pairs.py).
CREATE OR REPLACE FUNCTION public.kc_session_delivery(p_learning_mode text, p_number integer)
 RETURNS text
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
AS $function$
    SELECT CASE
        WHEN p_learning_mode = 'home' THEN 'home'
        WHEN p_number <= 6 OR (p_number - 6) % 2 = 1 THEN 'online'
        ELSE 'home'
    END
$function$

-- May this trainer take this one session at that local date and start? NULL, or '<code>:
-- <sentence>' of the first rule failed: on leave that day first, then kc_session_fit_rules.
-- Shared by moves, substitutes and leave.
CREATE OR REPLACE FUNCTION public.kc_session_fit(p_session_id uuid, p_trainer_id uuid, p_date date, p_start time without time zone, p_full boolean)
 RETURNS text
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- The matching rules for one session (0018's kc_session_fit): the time itself, the student
-- free, with p_full active, specialty, gender and range, always availability over the whole
-- slot, no overlapping session, neighbours within reach. No capacity: one session is no
-- allocation.
CREATE OR REPLACE FUNCTION public.kc_session_fit_rules(p_session_id uuid, p_trainer_id uuid, p_date date, p_start time without time zone, p_full boolean)
 RETURNS text
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- Writes the history line of one session's change (ref: its purchase).
CREATE OR REPLACE FUNCTION public.kc_session_history(p_session_id uuid, p_event text, p_detail text)
 RETURNS void
 LANGUAGE sql
AS $function$
    INSERT INTO stage_history (stage, ref_id, event, detail)
    SELECT 'allocation', ta.purchase_id, p_event,
           format('session %s on %s at %s: %s', ts.session_number, ts.scheduled_date,
                  to_char(ts.scheduled_time, 'HH24:MI'), p_detail)
    FROM tutoring_sessions ts JOIN trainer_allocations ta ON ta.id = ts.allocation_id
    WHERE ts.id = p_session_id
$function$

-- The business events of new sessions: SESSIONS_GENERATED per allocation and the student's
-- notification.
CREATE OR REPLACE FUNCTION public.kc_sessions_events(p_ids uuid[])
 RETURNS integer
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
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
$function$

-- When a session starting at a time ends: 24:00 at midnight exactly, NULL past midnight. The
-- one SQL home of "ends by midnight", the SQL half of schedule.slot_end
-- (tests/test_rule_pairs.py).
CREATE OR REPLACE FUNCTION public.kc_slot_end(p_start time without time zone, p_minutes integer)
 RETURNS time without time zone
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE STRICT
AS $function$ SELECT CASE WHEN extract(epoch FROM p_start) + 60 * p_minutes = 86400 THEN time '24:00'
                  WHEN extract(epoch FROM p_start) + 60 * p_minutes < 86400
                  THEN p_start + make_interval(mins => p_minutes) END $function$

-- Writes built business events in order (a change written twice is stored once) and wakes the
-- relay at commit; returns how many were new.
CREATE OR REPLACE FUNCTION public.kc_store_events(p_purchases uuid[], p_events jsonb[])
 RETURNS integer
 LANGUAGE plpgsql
AS $function$
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
$function$

-- kc_session_fit at the session's own date and time.
CREATE OR REPLACE FUNCTION public.kc_substitute_fit(p_session_id uuid, p_trainer uuid, p_full boolean)
 RETURNS text
 LANGUAGE sql
 STABLE
AS $function$
    SELECT kc_session_fit(ts.id, p_trainer, ts.scheduled_date, ts.scheduled_time, p_full)
    FROM tutoring_sessions ts WHERE ts.id = p_session_id
$function$

-- Gives one locked session to a substitute (named, or the best who fits), each candidate re-
-- checked under their lock; returns the substitute, or NULL with why nobody took it.
CREATE OR REPLACE FUNCTION public.kc_substitute_one(p_session_id uuid, p_named uuid, p_leave bigint, OUT substitute uuid, OUT why text)
 RETURNS record
 LANGUAGE plpgsql
AS $function$
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
$function$

-- substitute_session's work: a named trainer checked by every rule, or the best.
CREATE OR REPLACE FUNCTION public.kc_substitute_session(p_session_id uuid, p_trainer uuid)
 RETURNS uuid
 LANGUAGE plpgsql
AS $function$
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
$function$

-- Whether a session of that length may be at that local date and time at all, whoever teaches
-- it: NULL, or '<code>: <why>' (ends after midnight, by kc_slot_end; a holiday).
CREATE OR REPLACE FUNCTION public.kc_time_refusal(p_date date, p_start time without time zone, p_minutes integer)
 RETURNS text
 LANGUAGE sql
 STABLE
 SET search_path TO 'public', 'pg_temp'
AS $function$
    SELECT CASE
        WHEN kc_slot_end(p_start, p_minutes) IS NULL THEN
            format('ends_after_midnight: a %s-minute session at %s would end after midnight',
                   p_minutes, kc_clock(p_start))
        WHEN h.day IS NOT NULL THEN
            format('holiday: %s is a holiday (%s)', kc_long_date(p_date), h.reason)
    END
    FROM (SELECT 1) one
    LEFT JOIN holidays h ON h.day = p_date
$function$

-- How many live allocations a trainer may hold, by rating (4 to 8): the SQL half of
-- matching.capacity_for (tests/test_rule_pairs.py).
CREATE OR REPLACE FUNCTION public.kc_trainer_capacity(rating numeric)
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$ SELECT CASE WHEN rating >= 4.6 THEN 8
                  WHEN rating >= 4.1 THEN 7
                  WHEN rating >= 3.6 THEN 6
                  WHEN rating >= 3.1 THEN 5
                  ELSE 4 END $function$

-- A trainer as the sentences name one: id and name.
CREATE OR REPLACE FUNCTION public.kc_trainer_label(p_trainer uuid)
 RETURNS text
 LANGUAGE sql
 STABLE
AS $function$ SELECT format('trainer %s (%s)', p_trainer,
                    coalesce((SELECT full_name FROM trainers WHERE id = p_trainer), '?')) $function$

-- kc_lock_trainer without waiting: false when another transaction holds the trainer (a batch
-- tries the next trainer instead of waiting in a circle).
CREATE OR REPLACE FUNCTION public.kc_try_lock_trainer(p_trainer uuid)
 RETURNS boolean
 LANGUAGE sql
AS $function$ SELECT pg_try_advisory_xact_lock(hashtextextended('kc-trainer:' || p_trainer::text, 0)) $function$

-- Retention: deletes business events older than p_keep that every consumer has passed.
CREATE OR REPLACE FUNCTION public.prune_business_events(p_keep interval)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- Retention: deletes stage history, pgqueuer's log and job starts older than p_keep (at least a
-- day).
CREATE OR REPLACE FUNCTION public.prune_history(p_keep interval)
 RETURNS TABLE(history_deleted bigint, log_deleted bigint, starts_deleted bigint)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- Counts a start of a job (job_starts), committed before the stage runs; returns the count.
CREATE OR REPLACE FUNCTION public.record_job_start(p_job bigint, p_stage text, p_ref uuid, p_worker uuid)
 RETURNS integer
 LANGUAGE sql
AS $function$
    INSERT INTO job_starts (job_id, stage, ref_id, last_worker)
    VALUES (p_job, p_stage, p_ref, p_worker)
    ON CONFLICT (job_id) DO UPDATE
    SET starts = job_starts.starts + 1, last_started_at = now(), last_worker = p_worker
    RETURNING starts
$function$

-- Registers a business event consumer with a cursor kept here, from the next event on or from
-- the oldest kept; returns its position.
CREATE OR REPLACE FUNCTION public.register_event_consumer(p_consumer text, p_from_start boolean DEFAULT false)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- An operator rejects a pending move, with the reason the requester reads.
CREATE OR REPLACE FUNCTION public.reject_session_move(p_request uuid, p_reason text, p_session text DEFAULT NULL::text)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- An operator replays every failed job of a stage; returns how many.
CREATE OR REPLACE FUNCTION public.replay_failed(p_stage text, p_session text DEFAULT NULL::text)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_actor    text := kc_begin_acting(kc_operator_actor(p_session));
    v_replayed integer;
BEGIN
    SELECT count(kc_replay_stage(stage, ref_id))::integer INTO v_replayed
    FROM (SELECT stage, ref_id FROM stage_jobs WHERE stage = p_stage AND status = 'failed') f;
    PERFORM kc_end_acting();
    RETURN v_replayed;
END
$function$

-- An operator runs a stage for a row again (a failed job, a rejected payment after its metadata
-- was fixed); recorded with the operator as actor.
CREATE OR REPLACE FUNCTION public.replay_stage(p_stage text, p_ref uuid, p_session text DEFAULT NULL::text)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_actor text   := kc_begin_acting(kc_operator_actor(p_session));
    v_job   bigint := kc_replay_stage(p_stage, p_ref);
BEGIN
    PERFORM kc_end_acting();
    RETURN v_job;
END
$function$

-- The app (kc_app) or an operator records a trainer's leave request: refused with a sentence
-- when the days are wrong or overlap another leave.
CREATE OR REPLACE FUNCTION public.request_leave(p_trainer uuid, p_first_day date, p_last_day date, p_reason text, p_session text DEFAULT NULL::text)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_actor text   := kc_begin_acting(kc_operator_actor(p_session));
    v_leave bigint := kc_request_leave(p_trainer, p_first_day, p_last_day, p_reason, v_actor);
BEGIN
    PERFORM kc_end_acting();
    RETURN v_leave;
END
$function$

-- The app or an operator asks to move one session: checked at once (kc_check_move), refused
-- with a sentence changing nothing; carried out at once when kc_settings says so and the
-- trainer fits, else pending.
CREATE OR REPLACE FUNCTION public.request_session_move(p_session_id uuid, p_new_date date, p_new_time text, p_request_type text, p_reason text, p_notes text DEFAULT NULL::text, p_session text DEFAULT NULL::text)
 RETURNS uuid
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- An operator moves a purchase's future sessions to another slot, start date or mode
-- (kc_reschedule), recorded with the operator as actor.
CREATE OR REPLACE FUNCTION public.reschedule(p_purchase uuid, p_time_slot text DEFAULT NULL::text, p_start_date date DEFAULT NULL::date, p_schedule_mode text DEFAULT NULL::text, p_session text DEFAULT NULL::text)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_actor   text   := kc_begin_acting(kc_operator_actor(p_session));
    v_request bigint := kc_reschedule(p_purchase, p_time_slot, p_start_date, p_schedule_mode);
BEGIN
    UPDATE schedule_changes SET requested_by = v_actor WHERE id = v_request;
    PERFORM kc_end_acting();
    RETURN v_request;
END
$function$

-- An operator asks the allocation stage to try waiting purchases again (those one trainer could
-- teach, or all).
CREATE OR REPLACE FUNCTION public.retry_pending_allocations(p_trainer uuid DEFAULT NULL::uuid)
 RETURNS integer
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$ SELECT kc_retry_pending(CASE WHEN p_trainer IS NOT NULL THEN ARRAY[p_trainer] END) $function$

-- Rows older than p_older_than whose next stage is missing, with what is holding them.
CREATE OR REPLACE FUNCTION public.stuck_rows(p_older_than interval DEFAULT '00:10:00'::interval)
 RETURNS TABLE(stage text, ref_id uuid, since timestamp with time zone, waiting_for text, job_status text)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    SELECT 'purchase', p.id, p.updated_at, 'a purchase', j.status
    FROM payments p
    LEFT JOIN stage_jobs j ON j.stage = 'purchase' AND j.ref_id = p.id
    WHERE p.status = 'succeeded' AND p.updated_at < now() - p_older_than
      AND NOT EXISTS (SELECT 1 FROM student_course_purchases pu WHERE pu.payment_id = p.id)
      AND NOT EXISTS (SELECT 1 FROM purchase_upgrades u WHERE u.payment_id = p.id)
      AND NOT EXISTS (SELECT 1 FROM payment_rejections r
                      WHERE r.payment_id = p.id AND r.resolved_at IS NULL)
    UNION ALL
    SELECT 'allocation', pu.id, pu.created_at,
           CASE WHEN ta.status = 'pending' THEN 'a trainer (' || ta.reason || ')'
                ELSE 'an allocation' END, j.status
    FROM student_course_purchases pu
    LEFT JOIN trainer_allocations ta ON ta.purchase_id = pu.id
         AND ta.status IN ('pending', 'approved')
    LEFT JOIN stage_jobs j ON j.stage = 'allocation' AND j.ref_id = pu.id
    WHERE pu.is_active AND pu.created_at < now() - p_older_than
      AND (ta.id IS NULL OR ta.status = 'pending')
    UNION ALL
    SELECT 'sessions', ta.id, ta.allocated_at, 'its sessions', j.status
    FROM trainer_allocations ta
    LEFT JOIN stage_jobs j ON j.stage = 'sessions' AND j.ref_id = ta.id
    WHERE ta.status = 'approved' AND ta.allocated_at < now() - p_older_than
      AND NOT EXISTS (SELECT 1 FROM tutoring_sessions ts WHERE ts.allocation_id = ta.id)
$function$

-- An operator puts a substitute on one session without leave: the named trainer (refused with
-- the rule's sentence when unfit) or the best who fits.
CREATE OR REPLACE FUNCTION public.substitute_session(p_session_id uuid, p_trainer uuid DEFAULT NULL::uuid, p_session text DEFAULT NULL::text)
 RETURNS uuid
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_actor      text := kc_begin_acting(kc_operator_actor(p_session));
    v_substitute uuid := kc_substitute_session(p_session_id, p_trainer);
BEGIN
    PERFORM kc_end_acting();
    RETURN v_substitute;
END
$function$

-- The safety net for enqueues a running job absorbed: unfit live allocations and reschedule
-- requests open too long are enqueued again.
CREATE OR REPLACE FUNCTION public.sweep_lifecycle(p_limit integer DEFAULT 500)
 RETURNS integer
 LANGUAGE sql
AS $function$
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
$function$

-- Enqueues the allocation stage for pending allocations, each waiting longer after every
-- attempt (doubling, at most a day).
CREATE OR REPLACE FUNCTION public.sweep_pending_allocations(p_min_age interval DEFAULT '00:05:00'::interval, p_limit integer DEFAULT 500)
 RETURNS integer
 LANGUAGE sql
AS $function$
    SELECT count(enqueue_stage('allocation', due.purchase_id))::integer
    FROM (
        SELECT ta.purchase_id FROM trainer_allocations ta
        WHERE ta.status = 'pending'
          AND ta.updated_at < now() - least(p_min_age * power(2, least(ta.attempts - 1, 20)),
                                            interval '1 day')
          AND NOT EXISTS (SELECT 1 FROM pgqueuer j
                          WHERE j.dedupe_key = 'allocation:' || ta.purchase_id
                            AND j.status = 'failed')
        ORDER BY ta.updated_at
        LIMIT p_limit
    ) due
$function$

-- The last line of defence for capacity: an approved allocation beyond the trainer's capacity
-- (kc_trainer_capacity) is refused unless capacity_override.
CREATE OR REPLACE FUNCTION public.trg_allocations_check_capacity()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_rating numeric;
    v_live   integer;
BEGIN
    IF NEW.status <> 'approved' OR NEW.trainer_id IS NULL THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = 'approved'
       AND OLD.trainer_id IS NOT DISTINCT FROM NEW.trainer_id
       AND OLD.capacity_override = NEW.capacity_override THEN
        RETURN NEW;
    END IF;
    IF NEW.capacity_override THEN
        -- Only an admin's override request for this purchase and trainer, being carried out
        -- in this transaction (it is closed in the same one), may set the rule aside.
        IF NOT EXISTS (SELECT 1 FROM allocation_requests r
                       WHERE r.purchase_id = NEW.purchase_id AND r.trainer_id = NEW.trainer_id
                         AND r.override AND r.status = 'open') THEN
            RAISE EXCEPTION 'capacity override for trainer % without an open override request '
                            'for purchase %', NEW.trainer_id, NEW.purchase_id
                USING ERRCODE = 'check_violation', CONSTRAINT = 'trainer_allocations_capacity',
                      HINT = 'use assign_trainer(purchase, trainer, true, note)';
        END IF;
        RETURN NEW;
    END IF;
    PERFORM kc_lock_trainer(NEW.trainer_id);
    SELECT rating INTO v_rating FROM trainers WHERE id = NEW.trainer_id;
    SELECT count(*) INTO v_live FROM trainer_allocations
    WHERE trainer_id = NEW.trainer_id AND status = 'approved' AND id <> NEW.id;
    IF v_live >= kc_trainer_capacity(v_rating) THEN
        RAISE EXCEPTION 'trainer % is at capacity (% of % live allocations)',
            NEW.trainer_id, v_live, kc_trainer_capacity(v_rating)
            USING ERRCODE = 'check_violation', CONSTRAINT = 'trainer_allocations_capacity';
    END IF;
    RETURN NEW;
END
$function$

-- An allocation that becomes approved (or changes trainer) enqueues the sessions stage.
CREATE OR REPLACE FUNCTION public.trg_allocations_enqueue_sessions()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    IF NEW.status = 'approved' AND NEW.trainer_id IS NOT NULL AND (
           TG_OP = 'INSERT'
        OR OLD.status IS DISTINCT FROM NEW.status
        OR OLD.trainer_id IS DISTINCT FROM NEW.trainer_id)
    THEN
        PERFORM enqueue_stage('sessions', NEW.id);
    END IF;
    RETURN NULL;
END
$function$

-- At commit: settles trainer_load for every trainer the transaction touched, locked in id
-- order, then recounted.
CREATE OR REPLACE FUNCTION public.trg_allocations_load_settle()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_touched uuid[];
BEGIN
    v_touched := ARRAY(SELECT DISTINCT t::uuid
                       FROM unnest(string_to_array(
                                nullif(current_setting('kc.load_touched', true), ''), ',')) t
                       ORDER BY 1);
    IF cardinality(v_touched) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('kc.load_touched', '', true);
    -- Trainers created in this transaction before 0020's trigger existed have no row yet.
    INSERT INTO trainer_load (trainer_id)
    SELECT t FROM unnest(v_touched) t
    WHERE EXISTS (SELECT 1 FROM trainers WHERE id = t)
    ORDER BY 1
    ON CONFLICT (trainer_id) DO NOTHING;
    PERFORM 1 FROM trainer_load WHERE trainer_id = ANY (v_touched)
    ORDER BY trainer_id FOR UPDATE;
    -- A statement of its own after the locks: it sees every commit that held them before.
    UPDATE trainer_load l
    SET live_allocations = (SELECT count(*) FROM trainer_allocations ta
                            WHERE ta.trainer_id = l.trainer_id AND ta.status = 'approved')
    WHERE l.trainer_id = ANY (v_touched);
    RETURN NULL;
END
$function$

-- Once per statement on trainer_allocations: the trainers it touched are remembered
-- (kc_load_touch).
CREATE OR REPLACE FUNCTION public.trg_allocations_load_touch()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM kc_load_touch(ARRAY(SELECT DISTINCT n.trainer_id FROM new_allocations n
                                    WHERE n.status = 'approved' AND n.trainer_id IS NOT NULL));
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM kc_load_touch(ARRAY(SELECT DISTINCT o.trainer_id FROM old_allocations o
                                    WHERE o.status = 'approved' AND o.trainer_id IS NOT NULL));
    ELSE
        PERFORM kc_load_touch(ARRAY(
            SELECT DISTINCT t
            FROM old_allocations o
            JOIN new_allocations n ON n.id = o.id
            CROSS JOIN LATERAL (VALUES (CASE WHEN o.status = 'approved' THEN o.trainer_id END),
                                       (CASE WHEN n.status = 'approved' THEN n.trainer_id END))
                 v(t)
            WHERE t IS NOT NULL
              AND (o.status IS DISTINCT FROM n.status
                   OR o.trainer_id IS DISTINCT FROM n.trainer_id)));
    END IF;
    RETURN NULL;
END
$function$

-- Allocations that ended free their trainers' capacity: waiting purchases those trainers could
-- teach are tried again.
CREATE OR REPLACE FUNCTION public.trg_allocations_retry_pending()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_trainers uuid[] := ARRAY(
        SELECT DISTINCT o.trainer_id
        FROM old_allocations o JOIN new_allocations n ON n.id = o.id
        WHERE o.status = 'approved' AND n.status IN ('cancelled', 'completed')
          AND o.trainer_id IS NOT NULL);
BEGIN
    IF cardinality(v_trainers) > 0 THEN
        PERFORM kc_retry_pending(v_trainers);
    END IF;
    RETURN NULL;
END
$function$

-- Availability removed or narrowed: the trainers' live allocations are checked
-- (kc_check_trainers).
CREATE OR REPLACE FUNCTION public.trg_availability_check_live_allocations()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    PERFORM kc_check_trainers(ARRAY(SELECT DISTINCT trainer_id FROM removed_availability));
    RETURN NULL;
END
$function$

-- Availability added or changed: waiting purchases the trainers could teach are tried again.
CREATE OR REPLACE FUNCTION public.trg_availability_retry_pending()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    PERFORM kc_retry_pending(ARRAY(SELECT DISTINCT trainer_id FROM new_availability));
    RETURN NULL;
END
$function$

-- New allocations: their business events (kc_allocation_events).
CREATE OR REPLACE FUNCTION public.trg_events_allocations_inserted()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    PERFORM kc_allocation_events(array_agg(id), array_agg(NULL::text))
    FROM new_allocations
    HAVING count(*) > 0;
    RETURN NULL;
END
$function$

-- Allocations that changed: their business events (kc_allocation_events).
CREATE OR REPLACE FUNCTION public.trg_events_allocations_updated()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    PERFORM kc_allocation_events(array_agg(n.id), array_agg(o.status))
    FROM new_allocations n JOIN old_allocations o ON o.id = n.id
    WHERE o.status IS DISTINCT FROM n.status
    HAVING count(*) > 0;
    RETURN NULL;
END
$function$

-- New purchases: their business events (kc_purchase_events).
CREATE OR REPLACE FUNCTION public.trg_events_purchases_inserted()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    PERFORM kc_purchase_events(array_agg(id)) FROM new_purchases HAVING count(*) > 0;
    RETURN NULL;
END
$function$

-- Courses that finished (completed_at set): COURSE_COMPLETED and the student's congratulations.
CREATE OR REPLACE FUNCTION public.trg_events_purchases_updated()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- New sessions: their business events (kc_sessions_events).
CREATE OR REPLACE FUNCTION public.trg_events_sessions_inserted()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    PERFORM kc_sessions_events(array_agg(id)) FROM new_sessions HAVING count(*) > 0;
    RETURN NULL;
END
$function$

-- A scheduled session whose trainer changes at its own time tells the app: SESSION_SUBSTITUTED
-- and the student's and both trainers' notifications.
CREATE OR REPLACE FUNCTION public.trg_events_sessions_substituted()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- Sessions that changed status: SESSION_COMPLETED, COURSE_PROGRESS_UPDATED and the student's
-- notifications.
CREATE OR REPLACE FUNCTION public.trg_events_sessions_updated()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- A payment that becomes succeeded (or whose metadata is corrected while it has no purchase)
-- enqueues the purchase stage.
CREATE OR REPLACE FUNCTION public.trg_payments_enqueue_purchase()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    IF NEW.status = 'succeeded' AND (
           TG_OP = 'INSERT'
        OR OLD.status IS DISTINCT FROM 'succeeded'
        OR (OLD.metadata IS DISTINCT FROM NEW.metadata
            AND NOT EXISTS (SELECT 1 FROM student_course_purchases WHERE payment_id = NEW.id)))
    THEN
        PERFORM enqueue_stage('purchase', NEW.id);
    END IF;
    RETURN NULL;
END
$function$

-- A payment that becomes refunded ends its purchase (apply_refund).
CREATE OR REPLACE FUNCTION public.trg_payments_refunded()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    IF NEW.status = 'refunded' AND OLD.status IS DISTINCT FROM 'refunded' THEN
        PERFORM apply_refund(NEW.id);
    END IF;
    RETURN NULL;
END
$function$

-- Keeps payments.updated_at current.
CREATE OR REPLACE FUNCTION public.trg_payments_touch()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$function$

-- When a job leaves pgqueuer's table, the follow-ups asked while it ran (stage_followups) are
-- enqueued.
CREATE OR REPLACE FUNCTION public.trg_pgqueuer_followups()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_enqueued integer;
BEGIN
    WITH due AS (
        DELETE FROM stage_followups f
        USING finished j
        WHERE f.stage = j.entrypoint AND f.ref_id = kc_job_ref(j.entrypoint, j.dedupe_key)
        RETURNING f.stage, f.ref_id
    )
    SELECT count(enqueue_stage(due.stage, due.ref_id)) INTO v_enqueued FROM due;
    RETURN NULL;
END
$function$

-- A new purchase enqueues the allocation stage.
CREATE OR REPLACE FUNCTION public.trg_purchases_enqueue_allocation()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    PERFORM enqueue_stage('allocation', NEW.id);
    RETURN NULL;
END
$function$

-- A raised tier (an upgrade) enqueues the allocation stage for the extra sessions.
CREATE OR REPLACE FUNCTION public.trg_purchases_tier_raised()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    IF NEW.is_active AND NEW.purchase_tier > OLD.purchase_tier THEN
        PERFORM enqueue_stage('allocation', NEW.id);
    END IF;
    RETURN NULL;
END
$function$

-- requested_by of a request is set by the operator function that records it, never by a writer
-- of the table.
CREATE OR REPLACE FUNCTION public.trg_requested_by_guard()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM kc_acting a
                   WHERE a.pid = pg_backend_pid() AND a.actor = NEW.requested_by) THEN
        RAISE EXCEPTION '%.requested_by is decided by the database: the operator function '
                        'that records a request names who asked', TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$function$

-- An approved move tells the app in its transaction: SESSION_RESCHEDULED and the notifications,
-- and with a substitute SESSION_SUBSTITUTED and the three trainers' and student's
-- notifications.
CREATE OR REPLACE FUNCTION public.trg_reschedules_approved()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- The last line of defence for the hybrid split: a session's delivery follows its number
-- (kc_session_delivery).
CREATE OR REPLACE FUNCTION public.trg_sessions_check_delivery()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_mode text;
BEGIN
    SELECT pu.learning_mode INTO v_mode
    FROM trainer_allocations ta
    JOIN student_course_purchases pu ON pu.id = ta.purchase_id
    WHERE ta.id = NEW.allocation_id;
    IF NEW.delivery IS DISTINCT FROM kc_session_delivery(v_mode, NEW.session_number) THEN
        RAISE EXCEPTION 'session % of a % course is %, not %', NEW.session_number, v_mode,
            kc_session_delivery(v_mode, NEW.session_number), NEW.delivery
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tutoring_sessions_delivery';
    END IF;
    RETURN NEW;
END
$function$

-- The hybrid split for inserted sessions, once per statement over its new rows.
CREATE OR REPLACE FUNCTION public.trg_sessions_check_delivery_inserted()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
    v record;
BEGIN
    SELECT n.session_number, pu.learning_mode, n.delivery INTO v
    FROM new_sessions n
    JOIN trainer_allocations ta ON ta.id = n.allocation_id
    JOIN student_course_purchases pu ON pu.id = ta.purchase_id
    WHERE n.delivery IS DISTINCT FROM kc_session_delivery(pu.learning_mode, n.session_number)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'session % of a % course is %, not %', v.session_number,
            v.learning_mode, kc_session_delivery(v.learning_mode, v.session_number), v.delivery
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tutoring_sessions_delivery';
    END IF;
    RETURN NULL;
END
$function$

-- A session's status moves forward only: cancelled stays cancelled, nothing becomes scheduled
-- again, completed or missed only once started.
CREATE OR REPLACE FUNCTION public.trg_sessions_guard_status()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
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
$function$

-- A session cancelled while its allocation is live leaves the purchase short: the allocation
-- stage appends a make-up.
CREATE OR REPLACE FUNCTION public.trg_sessions_makeup()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$

-- Sessions cancelled free their time: waiting purchases are tried again.
CREATE OR REPLACE FUNCTION public.trg_sessions_retry_pending()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_trainers uuid[] := ARRAY(
        SELECT DISTINCT trainer_id FROM updated_sessions WHERE status = 'cancelled');
BEGIN
    IF cardinality(v_trainers) > 0 THEN
        PERFORM kc_retry_pending(v_trainers);
    END IF;
    RETURN NULL;
END
$function$

-- Whoever changes a session's trainer, the columns beside it follow: the first change records
-- whose it was, back to that trainer clears them.
CREATE OR REPLACE FUNCTION public.trg_sessions_substitute_columns()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
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
$function$

-- Sets stage_history.actor from kc_acting, whatever the writer gave.
CREATE OR REPLACE FUNCTION public.trg_stage_history_actor()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    NEW.actor := (SELECT a.actor FROM kc_acting a WHERE a.pid = pg_backend_pid());
    RETURN NEW;
END
$function$

-- A trainer who changed (status, specialties, gender, radius, base): their live allocations are
-- checked (kc_check_trainers).
CREATE OR REPLACE FUNCTION public.trg_trainers_check_live_allocations()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    PERFORM kc_check_trainers(ARRAY[NEW.id]);
    RETURN NULL;
END
$function$

-- Every trainer has a trainer_load row from the start, so settling only updates.
CREATE OR REPLACE FUNCTION public.trg_trainers_load_row()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    INSERT INTO trainer_load (trainer_id)
    SELECT n.id FROM new_trainers n
    ON CONFLICT (trainer_id) DO NOTHING;
    RETURN NULL;
END
$function$

-- Trainers added or changed while active: waiting purchases they could teach are tried again.
CREATE OR REPLACE FUNCTION public.trg_trainers_retry_pending()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    v_trainers uuid[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        v_trainers := ARRAY(SELECT id FROM new_trainers WHERE status = 'active');
    ELSE
        v_trainers := ARRAY(
            SELECT n.id FROM new_trainers n JOIN old_trainers o ON o.id = n.id
            WHERE n.status = 'active'
              AND (o.status, o.specialties, o.service_radius_km, o.base_lat, o.base_lng,
                   o.rating, o.gender)
                  IS DISTINCT FROM (n.status, n.specialties, n.service_radius_km, n.base_lat,
                                    n.base_lng, n.rating, n.gender));
    END IF;
    IF cardinality(v_trainers) > 0 THEN
        PERFORM kc_retry_pending(v_trainers);
    END IF;
    RETURN NULL;
END
$function$
