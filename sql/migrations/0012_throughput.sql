-- Throughput (issue 15).
--
-- Batches: an allocation batch holds the locks of the trainers it booked until it
-- commits. Waiting for a trainer another batch holds would make batches wait on each other
-- in circles (deadlocks); the allocation stage tries the lock first and moves on to the next
-- ranked trainer when it is held. Same key as kc_lock_trainer (0005), so the two exclude
-- each other.
CREATE FUNCTION kc_try_lock_trainer(p_trainer uuid) RETURNS boolean
LANGUAGE sql AS $$ SELECT pg_try_advisory_xact_lock(hashtextextended('kc-trainer:' || p_trainer::text, 0)) $$;
GRANT EXECUTE ON FUNCTION kc_try_lock_trainer(uuid) TO kc_worker;

-- The distance function could not be inlined into the queries that call it: a STRICT SQL
-- function whose body holds a non-strict construct (least) runs as a function call per row,
-- about 10 us each; the trainer search calls it for every candidate and for every session
-- near a new one (measured: the search's sequential-distance part 0.73 -> 0.13 ms per
-- trainer). Not STRICT, and without least(), so that the planner inlines it; a NULL argument
-- still gives NULL (greatest() ignores the NULL, the subtraction keeps it).
CREATE OR REPLACE FUNCTION kc_haversine_km(lat1 float8, lng1 float8, lat2 float8, lng2 float8)
RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 2 * 6371.0 * asin(sqrt(
        (sin(radians(lat2 - lat1) / 2) ^ 2
         + cos(radians(lat1)) * cos(radians(lat2)) * sin(radians(lng2 - lng1) / 2) ^ 2)
      - greatest(sin(radians(lat2 - lat1) / 2) ^ 2
                 + cos(radians(lat1)) * cos(radians(lat2)) * sin(radians(lng2 - lng1) / 2) ^ 2
                 - 1.0, 0))) $$;

-- The trainer search looks only inside the box that the largest service radius of an
-- active trainer draws around the student's home; this index gives that radius at once
-- (max() of the indexed expression reads one end of it). An expression index, not a partial
-- one: the planner would otherwise scan it for every active trainer instead of the
-- specialty index.
CREATE INDEX trainers_active_radius_idx
    ON trainers ((CASE WHEN status = 'active' THEN service_radius_km END));
-- ... and this one the active trainers based inside that box.
CREATE INDEX trainers_active_base_idx ON trainers (base_lat, base_lng) WHERE status = 'active';

-- Every allocation and sessions job reads where the purchase's schedule stands over all of
-- its allocations (purchase_progress, lock_allocations_for_sessions): by purchase_id, which
-- only the partial index of live allocations covered. A prepared (generic) plan then scanned
-- the whole table per job (5,000 allocations: 1.1 ms of a 2.6 ms query; linear in the table).
CREATE INDEX trainer_allocations_purchase_idx ON trainer_allocations (purchase_id);

-- Sessions are written a batch at a time: the check that a session's delivery follows its
-- number (0008) runs once per INSERT statement over its new rows, instead of a PL/pgSQL call
-- and a lookup per row. An UPDATE of the columns it reads stays checked row by row (a
-- trigger with a column list cannot have a transition table).
CREATE FUNCTION trg_sessions_check_delivery_inserted() RETURNS trigger
LANGUAGE plpgsql
AS $$
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
$$;

DROP TRIGGER tutoring_sessions_check_delivery ON tutoring_sessions;
CREATE TRIGGER tutoring_sessions_check_delivery
    BEFORE UPDATE OF delivery, session_number, allocation_id ON tutoring_sessions
    FOR EACH ROW EXECUTE FUNCTION trg_sessions_check_delivery();
CREATE TRIGGER tutoring_sessions_check_delivery_inserted
    AFTER INSERT ON tutoring_sessions
    REFERENCING NEW TABLE AS new_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION trg_sessions_check_delivery_inserted();
