-- 0002 matching: admin assignment requests, capacity overrides, automatic retries of pending
-- allocations when something changes that could change the answer.

ALTER TABLE trainer_allocations
    -- An admin assignment that was allowed past the capacity rule (recorded, never silent).
    ADD COLUMN capacity_override boolean NOT NULL DEFAULT false,
    DROP CONSTRAINT trainer_allocations_reason_check,
    ADD CONSTRAINT trainer_allocations_reason_check CHECK (reason IN (
        'no_trainer', 'no_specialty', 'gender_mismatch', 'out_of_range', 'no_free_slot',
        'too_far_between_sessions', 'at_capacity', 'trainer_inactive', 'refunded',
        'reassigned'));

CREATE OR REPLACE FUNCTION trg_allocations_check_capacity() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_rating numeric;
    v_live   integer;
BEGIN
    IF NEW.status <> 'approved' OR NEW.trainer_id IS NULL OR NEW.capacity_override THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = 'approved'
       AND OLD.trainer_id IS NOT DISTINCT FROM NEW.trainer_id THEN
        RETURN NEW;
    END IF;
    -- The row lock serialises every approval for this trainer.
    SELECT rating INTO v_rating FROM trainers WHERE id = NEW.trainer_id FOR NO KEY UPDATE;
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

-- Admin assignment: a request the allocation stage carries out with the same rules (unless
-- override) and the same next stage. Kept forever as the record of who asked for what.
CREATE TABLE allocation_requests (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    purchase_id  uuid NOT NULL REFERENCES student_course_purchases (id),
    trainer_id   uuid NOT NULL REFERENCES trainers (id),
    override     boolean NOT NULL DEFAULT false,
    note         text,
    requested_by text NOT NULL DEFAULT session_user,
    requested_at timestamptz NOT NULL DEFAULT now(),
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done', 'refused')),
    outcome      text,
    decided_at   timestamptz,
    allocation_id uuid REFERENCES trainer_allocations (id),
    CHECK (NOT override OR note IS NOT NULL),
    CHECK ((status = 'open') = (decided_at IS NULL))
);
CREATE INDEX allocation_requests_open_idx ON allocation_requests (purchase_id, id)
    WHERE status = 'open';

CREATE FUNCTION assign_trainer(p_purchase uuid, p_trainer uuid, p_override boolean DEFAULT false,
                               p_note text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    v_request bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM student_course_purchases WHERE id = p_purchase AND is_active)
    THEN
        RAISE EXCEPTION 'no active purchase %', p_purchase USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM trainers WHERE id = p_trainer) THEN
        RAISE EXCEPTION 'no trainer %', p_trainer USING ERRCODE = 'no_data_found';
    END IF;
    IF p_override AND nullif(btrim(p_note), '') IS NULL THEN
        RAISE EXCEPTION 'an override needs a note saying why'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO allocation_requests (purchase_id, trainer_id, override, note)
    VALUES (p_purchase, p_trainer, p_override, p_note)
    RETURNING id INTO v_request;
    PERFORM enqueue_stage('allocation', p_purchase);
    RETURN v_request;
END
$$;

-- Enqueue the allocation stage for pending purchases a trainer could now serve (all pending
-- purchases when p_trainer is NULL). Returns how many were enqueued.
CREATE FUNCTION retry_pending_allocations(p_trainer uuid DEFAULT NULL)
RETURNS integer
LANGUAGE sql
AS $$
    SELECT count(enqueue_stage('allocation', ta.purchase_id))::integer
    FROM trainer_allocations ta
    JOIN courses c ON c.id = ta.course_id
    WHERE ta.status = 'pending'
      AND (p_trainer IS NULL OR EXISTS (
            SELECT 1 FROM trainers t
            WHERE t.id = p_trainer AND t.status = 'active'
              AND t.specialties_norm && array_remove(
                    ARRAY[lower(btrim(c.category)), lower(btrim(c.subcategory))], NULL)))
$$;

-- The periodic sweep: pending allocations not tried for `p_min_age` are tried again.
CREATE FUNCTION sweep_pending_allocations(p_min_age interval DEFAULT interval '5 minutes')
RETURNS integer
LANGUAGE sql
AS $$
    SELECT count(enqueue_stage('allocation', purchase_id))::integer
    FROM trainer_allocations
    WHERE status = 'pending' AND updated_at < now() - p_min_age
$$;

CREATE FUNCTION trg_trainers_retry_pending() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.status = 'active' AND (TG_OP = 'INSERT'
        OR OLD.status IS DISTINCT FROM NEW.status
        OR OLD.specialties IS DISTINCT FROM NEW.specialties
        OR OLD.service_radius_km IS DISTINCT FROM NEW.service_radius_km
        OR OLD.base_lat IS DISTINCT FROM NEW.base_lat
        OR OLD.base_lng IS DISTINCT FROM NEW.base_lng
        OR OLD.rating IS DISTINCT FROM NEW.rating
        OR OLD.gender IS DISTINCT FROM NEW.gender)
    THEN
        PERFORM retry_pending_allocations(NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER trainers_retry_pending
AFTER INSERT OR UPDATE ON trainers
FOR EACH ROW EXECUTE FUNCTION trg_trainers_retry_pending();

CREATE FUNCTION trg_availability_retry_pending() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM retry_pending_allocations(NEW.trainer_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER trainer_availability_retry_pending
AFTER INSERT OR UPDATE ON trainer_availability
FOR EACH ROW EXECUTE FUNCTION trg_availability_retry_pending();

-- An approved allocation that ends (cancelled, completed) frees capacity for its trainer.
CREATE FUNCTION trg_allocations_retry_pending() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF OLD.status = 'approved' AND NEW.status IN ('cancelled', 'completed') THEN
        PERFORM retry_pending_allocations(OLD.trainer_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER trainer_allocations_retry_pending
AFTER UPDATE OF status ON trainer_allocations
FOR EACH ROW EXECUTE FUNCTION trg_allocations_retry_pending();

-- A cancelled session frees its trainer's time.
CREATE FUNCTION trg_sessions_retry_pending() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM retry_pending_allocations(t.trainer_id)
    FROM (SELECT DISTINCT trainer_id FROM updated_sessions WHERE status = 'cancelled') t;
    RETURN NULL;
END
$$;

CREATE TRIGGER tutoring_sessions_retry_pending
AFTER UPDATE ON tutoring_sessions
REFERENCING NEW TABLE AS updated_sessions
FOR EACH STATEMENT EXECUTE FUNCTION trg_sessions_retry_pending();
