-- 0001 foundation: the schema contract, the stage history, the enqueue function and the triggers.
-- pgqueuer's own tables are installed just before this file (sql/pgqueuer/pgqueuer-1.6.0.sql).

-------------------------------------------------------------------------------------------------
-- Helpers
-------------------------------------------------------------------------------------------------

-- Lower-cased, trimmed copy of a text array: specialties are matched case-insensitively.
CREATE FUNCTION kc_lower_array(items text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT coalesce(array_agg(lower(btrim(item)) ORDER BY ord), '{}')
      FROM unnest(items) WITH ORDINALITY AS t(item, ord) WHERE item IS NOT NULL $$;

-- Great-circle distance in kilometres (haversine, mean Earth radius 6371 km).
CREATE FUNCTION kc_haversine_km(lat1 double precision, lng1 double precision,
                                lat2 double precision, lng2 double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT 2 * 6371.0 * asin(least(1.0, sqrt(
          sin(radians(lat2 - lat1) / 2) ^ 2
        + cos(radians(lat1)) * cos(radians(lat2)) * sin(radians(lng2 - lng1) / 2) ^ 2))) $$;

-- Trainer capacity (live allocations) by rating, as the business rules state it.
CREATE FUNCTION kc_trainer_capacity(rating numeric) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN rating >= 4.6 THEN 8
                  WHEN rating >= 4.1 THEN 7
                  WHEN rating >= 3.6 THEN 6
                  WHEN rating >= 3.1 THEN 5
                  ELSE 4 END $$;

-- A trainer's session as a degenerate box: x = a 52-bit key derived from the trainer id,
-- y = the session's epoch seconds. Two boxes overlap only for the same trainer and
-- overlapping times, so a GiST exclusion constraint on it forbids double booking with the
-- built-in box operator class (no btree_gist needed, which embedded servers may lack).
-- Distinct trainers whose keys collide (about 1 in 2^52) would only be refused, never
-- double-booked. The end is pulled in by a millisecond so back-to-back sessions do not touch.
CREATE FUNCTION kc_trainer_time_box(trainer_id uuid, starts_at timestamptz, ends_at timestamptz)
RETURNS box
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$ SELECT box(
          point(('x' || substr(md5(trainer_id::text), 1, 13))::bit(52)::bigint::float8,
                extract(epoch FROM starts_at AT TIME ZONE 'UTC')::float8),
          point(('x' || substr(md5(trainer_id::text), 1, 13))::bit(52)::bigint::float8,
                extract(epoch FROM ends_at AT TIME ZONE 'UTC')::float8 - 0.001)) $$;

-------------------------------------------------------------------------------------------------
-- Input tables (written by the payment service, the app and admins)
-------------------------------------------------------------------------------------------------

CREATE TABLE courses (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    title       text NOT NULL CHECK (btrim(title) <> ''),
    category    text NOT NULL CHECK (btrim(category) <> ''),
    subcategory text CHECK (btrim(subcategory) <> ''),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE students (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    full_name  text NOT NULL CHECK (btrim(full_name) <> ''),
    gender     text,
    home_lat   double precision NOT NULL CHECK (home_lat BETWEEN -90 AND 90),
    home_lng   double precision NOT NULL CHECK (home_lng BETWEEN -180 AND 180),
    timezone   text NOT NULL DEFAULT 'Asia/Kolkata',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE trainers (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    full_name         text NOT NULL CHECK (btrim(full_name) <> ''),
    gender            text,
    rating            numeric(3, 2) CHECK (rating BETWEEN 0 AND 5),
    specialties       text[] NOT NULL DEFAULT '{}',
    specialties_norm  text[] GENERATED ALWAYS AS (kc_lower_array(specialties)) STORED,
    base_lat          double precision NOT NULL CHECK (base_lat BETWEEN -90 AND 90),
    base_lng          double precision NOT NULL CHECK (base_lng BETWEEN -180 AND 180),
    service_radius_km numeric(7, 2) NOT NULL CHECK (service_radius_km > 0),
    status            text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX trainers_active_specialties_idx ON trainers USING gin (specialties_norm)
    WHERE status = 'active';

CREATE TABLE trainer_availability (
    trainer_id uuid NOT NULL REFERENCES trainers (id) ON DELETE CASCADE,
    weekday    smallint NOT NULL CHECK (weekday BETWEEN 1 AND 7),
    slot_start time NOT NULL,
    slot_end   time NOT NULL,
    PRIMARY KEY (trainer_id, weekday, slot_start),
    CHECK (slot_end > slot_start)
);

CREATE TABLE holidays (
    day    date PRIMARY KEY,
    reason text NOT NULL CHECK (btrim(reason) <> '')
);

CREATE TABLE payments (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    student_id   uuid NOT NULL REFERENCES students (id),
    course_id    uuid NOT NULL REFERENCES courses (id),
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    currency     text NOT NULL DEFAULT 'INR' CHECK (currency ~ '^[A-Z]{3}$'),
    status       text NOT NULL CHECK (status IN ('initiated', 'succeeded', 'failed', 'refunded')),
    metadata     jsonb NOT NULL DEFAULT '{}',
    confirmed_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_student_course_idx ON payments (student_id, course_id);

-------------------------------------------------------------------------------------------------
-- Output tables (written by the pipeline)
-------------------------------------------------------------------------------------------------

CREATE TABLE student_course_purchases (
    id                       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    payment_id               uuid NOT NULL UNIQUE REFERENCES payments (id),
    student_id               uuid NOT NULL REFERENCES students (id),
    course_id                uuid NOT NULL REFERENCES courses (id),
    purchase_tier            smallint NOT NULL CHECK (purchase_tier IN (10, 20, 30)),
    start_date               date NOT NULL,
    preferred_time_slot      time NOT NULL,
    schedule_mode            text NOT NULL
        CHECK (schedule_mode IN ('daily', 'weekdays', 'sunday_only')),
    session_duration_minutes smallint NOT NULL CHECK (session_duration_minutes BETWEEN 15 AND 240),
    -- Which metadata fields were absent and took their documented default.
    defaults_applied         text[] NOT NULL DEFAULT '{}',
    is_active                boolean NOT NULL DEFAULT true,
    created_at               timestamptz NOT NULL DEFAULT now(),
    deactivated_at           timestamptz,
    CHECK (is_active OR deactivated_at IS NOT NULL)
);
CREATE UNIQUE INDEX student_course_purchases_one_active_idx
    ON student_course_purchases (student_id, course_id) WHERE is_active;

CREATE TABLE trainer_allocations (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    purchase_id  uuid NOT NULL REFERENCES student_course_purchases (id),
    student_id   uuid NOT NULL REFERENCES students (id),
    course_id    uuid NOT NULL REFERENCES courses (id),
    trainer_id   uuid REFERENCES trainers (id),
    status       text NOT NULL CHECK (status IN ('pending', 'approved', 'cancelled', 'completed')),
    -- Machine-readable reason while pending (or why it was cancelled); the sentence is in
    -- reason_detail and in metadata.
    reason       text CHECK (reason IN ('no_trainer', 'no_specialty', 'gender_mismatch',
                                        'out_of_range', 'no_free_slot', 'too_far_between_sessions',
                                        'at_capacity', 'refunded', 'reassigned')),
    reason_detail text,
    metadata     jsonb NOT NULL DEFAULT '{}',
    attempts     integer NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    -- The first session day the matcher checked the trainer against; the sessions stage
    -- schedules from it, so what was checked is what gets written.
    first_session_date date,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    allocated_at timestamptz,
    CHECK (status <> 'pending' OR (reason IS NOT NULL AND reason_detail IS NOT NULL
                                   AND trainer_id IS NULL)),
    CHECK (status <> 'approved' OR (trainer_id IS NOT NULL AND allocated_at IS NOT NULL
                                    AND first_session_date IS NOT NULL))
);
-- One live allocation per purchase: a retry updates the pending row, it never adds one.
CREATE UNIQUE INDEX trainer_allocations_one_live_idx
    ON trainer_allocations (purchase_id) WHERE status IN ('pending', 'approved');
CREATE INDEX trainer_allocations_trainer_live_idx
    ON trainer_allocations (trainer_id) WHERE status = 'approved';
CREATE INDEX trainer_allocations_student_course_idx ON trainer_allocations (student_id, course_id);
CREATE INDEX trainer_allocations_pending_idx ON trainer_allocations (created_at)
    WHERE status = 'pending';

CREATE TABLE tutoring_sessions (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    allocation_id    uuid NOT NULL REFERENCES trainer_allocations (id),
    session_number   smallint NOT NULL CHECK (session_number >= 1),
    student_id       uuid NOT NULL REFERENCES students (id),
    trainer_id       uuid NOT NULL REFERENCES trainers (id),
    course_id        uuid NOT NULL REFERENCES courses (id),
    scheduled_date   date NOT NULL,
    scheduled_time   time NOT NULL,
    starts_at        timestamptz NOT NULL,
    ends_at          timestamptz NOT NULL,
    duration_minutes smallint NOT NULL CHECK (duration_minutes BETWEEN 15 AND 240),
    status           text NOT NULL DEFAULT 'scheduled'
        CHECK (status IN ('scheduled', 'completed', 'cancelled')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    cancelled_at     timestamptz,
    UNIQUE (allocation_id, session_number),
    CHECK (ends_at = starts_at + make_interval(mins => duration_minutes)),
    -- No trainer is ever in two places at once: the database refuses it.
    CONSTRAINT tutoring_sessions_no_trainer_overlap
        EXCLUDE USING gist (kc_trainer_time_box(trainer_id, starts_at, ends_at) WITH &&)
        WHERE (status = 'scheduled')
);
CREATE INDEX tutoring_sessions_trainer_time_idx ON tutoring_sessions (trainer_id, starts_at)
    WHERE status = 'scheduled';
CREATE INDEX tutoring_sessions_student_idx ON tutoring_sessions (student_id, starts_at);

-------------------------------------------------------------------------------------------------
-- Pipeline state: stage history, rejections
-------------------------------------------------------------------------------------------------

-- pgqueuer deletes a job when it succeeds; this table keeps what happened, forever
-- (until the retention job prunes it).
CREATE TABLE stage_history (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stage   text NOT NULL CHECK (stage IN ('purchase', 'allocation', 'sessions')),
    ref_id  uuid NOT NULL,
    event   text NOT NULL CHECK (event IN ('enqueued', 'succeeded', 'skipped', 'rejected',
                                           'failed', 'replayed', 'healed')),
    job_id  bigint,
    detail  text,
    error   jsonb,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX stage_history_ref_idx ON stage_history (ref_id, at);
CREATE INDEX stage_history_stage_at_idx ON stage_history (stage, at);

-- A succeeded payment whose metadata cannot make a purchase. Kept, visible, replayable:
-- fix payments.metadata and the pipeline retries it (the payments trigger), or call
-- replay_stage('purchase', payment_id).
CREATE TABLE payment_rejections (
    payment_id  uuid PRIMARY KEY REFERENCES payments (id),
    reason      text NOT NULL,
    errors      jsonb NOT NULL DEFAULT '[]',
    metadata    jsonb,
    rejections  integer NOT NULL DEFAULT 1,
    rejected_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz
);

CREATE VIEW rejected_payments AS
SELECT r.payment_id, p.student_id, p.course_id, r.reason, r.errors, r.metadata,
       r.rejections, r.rejected_at
FROM payment_rejections r
JOIN payments p ON p.id = r.payment_id
WHERE r.resolved_at IS NULL;

-------------------------------------------------------------------------------------------------
-- Enqueueing: the only way this project writes into pgqueuer's tables
-------------------------------------------------------------------------------------------------

-- Enqueue one stage job for one row, or return the live job that already exists for it.
-- Writes the row pgqueuer itself would write (job + 'queued' log line) and a history event.
-- The pgqueuer table trigger sends the NOTIFY at commit, so a rolled-back row enqueues nothing.
CREATE FUNCTION enqueue_stage(p_stage text, p_ref uuid, p_event text DEFAULT 'enqueued',
                              p_delay interval DEFAULT interval '0')
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_key    text := p_stage || ':' || p_ref;
    v_job_id bigint;
BEGIN
    IF p_stage NOT IN ('purchase', 'allocation', 'sessions') THEN
        RAISE EXCEPTION 'unknown stage %', p_stage
            USING HINT = 'stages are purchase, allocation and sessions';
    END IF;
    IF p_ref IS NULL THEN
        RAISE EXCEPTION 'enqueue_stage(%): the row id is NULL', p_stage;
    END IF;

    INSERT INTO pgqueuer (priority, entrypoint, payload, execute_after, dedupe_key, status)
    VALUES (0, p_stage, convert_to(p_ref::text, 'UTF8'), now() + p_delay, v_key, 'queued')
    ON CONFLICT (dedupe_key)
        WHERE status IN ('queued', 'picked') AND dedupe_key IS NOT NULL
        DO NOTHING
    RETURNING id INTO v_job_id;

    IF v_job_id IS NOT NULL THEN
        INSERT INTO pgqueuer_log (job_id, status, entrypoint, priority)
        VALUES (v_job_id, 'queued', p_stage, 0);
    ELSE
        SELECT id INTO v_job_id FROM pgqueuer
        WHERE dedupe_key = v_key AND status IN ('queued', 'picked');
    END IF;

    INSERT INTO stage_history (stage, ref_id, event, job_id)
    VALUES (p_stage, p_ref, p_event, v_job_id);
    RETURN v_job_id;
END
$$;

-------------------------------------------------------------------------------------------------
-- Triggers: each stage's row enqueues the next stage in the same transaction
-------------------------------------------------------------------------------------------------

-- A payment that becomes succeeded (insert or update) starts the pipeline. A succeeded
-- payment without a purchase whose metadata is corrected is tried again.
CREATE FUNCTION trg_payments_enqueue_purchase() RETURNS trigger
LANGUAGE plpgsql
AS $$
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
$$;

CREATE TRIGGER payments_enqueue_purchase
AFTER INSERT OR UPDATE OF status, metadata ON payments
FOR EACH ROW EXECUTE FUNCTION trg_payments_enqueue_purchase();

CREATE FUNCTION trg_payments_touch() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER payments_touch BEFORE UPDATE ON payments
FOR EACH ROW EXECUTE FUNCTION trg_payments_touch();

CREATE FUNCTION trg_purchases_enqueue_allocation() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM enqueue_stage('allocation', NEW.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER student_course_purchases_enqueue_allocation
AFTER INSERT ON student_course_purchases
FOR EACH ROW EXECUTE FUNCTION trg_purchases_enqueue_allocation();

CREATE FUNCTION trg_allocations_enqueue_sessions() RETURNS trigger
LANGUAGE plpgsql
AS $$
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
$$;

CREATE TRIGGER trainer_allocations_enqueue_sessions
AFTER INSERT OR UPDATE OF status, trainer_id ON trainer_allocations
FOR EACH ROW EXECUTE FUNCTION trg_allocations_enqueue_sessions();

-- Capacity is enforced by the database: approving an allocation locks the trainer row
-- (serialising every approval for that trainer) and counts its live allocations.
CREATE FUNCTION trg_allocations_check_capacity() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_rating numeric;
    v_status text;
    v_live   integer;
BEGIN
    IF NEW.status <> 'approved' OR NEW.trainer_id IS NULL THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = 'approved'
       AND OLD.trainer_id IS NOT DISTINCT FROM NEW.trainer_id THEN
        RETURN NEW;
    END IF;
    SELECT rating, status INTO v_rating, v_status
    FROM trainers WHERE id = NEW.trainer_id FOR NO KEY UPDATE;
    SELECT count(*) INTO v_live FROM trainer_allocations
    WHERE trainer_id = NEW.trainer_id AND status = 'approved' AND id <> NEW.id;
    IF v_live >= kc_trainer_capacity(v_rating) THEN
        RAISE EXCEPTION 'trainer % is at capacity (% of % live allocations)',
            NEW.trainer_id, v_live, kc_trainer_capacity(v_rating)
            USING ERRCODE = 'check_violation', CONSTRAINT = 'trainer_allocations_capacity';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER trainer_allocations_check_capacity
BEFORE INSERT OR UPDATE OF status, trainer_id ON trainer_allocations
FOR EACH ROW EXECUTE FUNCTION trg_allocations_check_capacity();
