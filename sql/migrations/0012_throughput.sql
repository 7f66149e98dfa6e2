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
