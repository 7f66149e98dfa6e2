-- Allocation stage: choose a trainer for a purchase, or record why it must wait.

-- name: lock_purchase_for_allocation
-- Locks the purchase: two jobs for one purchase never allocate at once.
SELECT pu.id, pu.student_id, pu.course_id, pu.purchase_tier, pu.start_date,
       pu.preferred_time_slot, pu.schedule_mode, pu.session_duration_minutes, pu.is_active,
       pu.learning_mode, pu.group_size, pu.preferred_trainer_id,
       s.timezone, s.gender AS student_gender, c.title AS course_title,
       live.id AS live_allocation_id, live.status AS live_allocation_status,
       live.trainer_id AS live_trainer_id
FROM student_course_purchases pu
JOIN students s ON s.id = pu.student_id
JOIN courses c ON c.id = pu.course_id
LEFT JOIN trainer_allocations live
       ON live.purchase_id = pu.id AND live.status IN ('pending', 'approved')
WHERE pu.id = %(purchase_id)s::uuid
FOR UPDATE OF pu;

-- name: purchase_flags
-- What the stage would otherwise ask in a statement each (usually: nothing). A statement of
-- its own after lock_purchase_for_allocation: that one's snapshot may predate its wait for
-- the lock, this one sees what committed meanwhile (a sessions stage, an admin's request).
SELECT EXISTS (SELECT 1 FROM allocation_requests r
               WHERE r.purchase_id = %(purchase_id)s::uuid AND r.status = 'open') AS has_request,
       EXISTS (SELECT 1 FROM schedule_changes sc
               WHERE sc.purchase_id = %(purchase_id)s::uuid AND sc.status = 'open')
           AS has_changes,
       EXISTS (SELECT 1 FROM tutoring_sessions ts
               WHERE ts.allocation_id = ANY (ARRAY(
                   SELECT ta.id FROM trainer_allocations ta
                   WHERE ta.purchase_id = %(purchase_id)s::uuid))) AS has_sessions;

-- name: count_active_trainers
SELECT count(*) AS active FROM trainers WHERE status = 'active';

-- name: candidate_facts
-- One row per active trainer who teaches the course (category or subcategory), or only the
-- trainer named by only_trainer (an admin request: then whatever their status or specialty),
-- with the facts the matching rules need; the columns are matching.CandidateFacts' fields, in
-- their order.
-- The new sessions arrive as parallel arrays. Rules are applied in matching.RULE_ORDER, so
-- the costly facts (overlaps, sequential distance) are only measured for trainers who pass
-- every rule before them (the filters in `timed` and the final SELECT follow that order); for
-- the others they are NULL, "not measured". tests/test_rule_order.py fails when they differ.
-- Trainers too far away for any radius are not measured (see `area`). With count_far the
-- query returns only them, counted, in at most two rows whose `trainers` says how many they
-- stand for.
WITH purchase AS (
    SELECT s.home_lat, s.home_lng, lower(btrim(s.gender)) AS gender,
           lower(btrim(c.category)) AS category, lower(btrim(c.subcategory)) AS subcategory
    FROM student_course_purchases pu
    JOIN students s ON s.id = pu.student_id
    JOIN courses c ON c.id = pu.course_id
    WHERE pu.id = %(purchase_id)s::uuid
), bounds AS MATERIALIZED (
    -- The new sessions as one multirange (and the ones at home widened by an hour for the
    -- neighbour rule, which concerns travel between homes only): one && per existing session
    -- instead of a join against every new session.
    SELECT min(t.starts_at) AS first_start, max(t.ends_at) AS last_end,
           range_agg(tstzrange(t.starts_at, t.ends_at)) AS busy,
           range_agg(tstzrange(t.starts_at - interval '1 hour', t.ends_at + interval '1 hour'))
               FILTER (WHERE t.at_home) AS near
    FROM unnest(%(starts)s::timestamptz[], %(ends)s::timestamptz[], %(at_home)s::boolean[])
         AS t(starts_at, ends_at, at_home)
), area AS MATERIALIZED (
    -- The box around the student's home beyond which no active trainer's service radius
    -- reaches (the largest radius; an index gives it): a trainer based outside it fails the
    -- distance rule, or an earlier one, so they are counted (`far`) instead of measured one
    -- by one. Longitude: the exact half-width asin(sin(r) / cos(lat)); the whole circle when
    -- the box would reach a pole or cross the antimeridian.
    SELECT p.home_lat - d.lat AS lat_min, p.home_lat + d.lat AS lat_max,
           p.home_lng - d.lng AS lng_min, p.home_lng + d.lng AS lng_max,
           d.lng >= 180 OR abs(p.home_lng) + d.lng > 180 AS every_lng, r.km
    FROM purchase p
    CROSS JOIN (SELECT coalesce(max(CASE WHEN status = 'active' THEN service_radius_km END),
                                0)::float8 AS km
                FROM trainers) r
    CROSS JOIN LATERAL (
        SELECT degrees(r.km / 6371.0) + 1e-6 AS lat,
               CASE WHEN sin(r.km / 6371.0) >= cos(radians(p.home_lat)) THEN 180
                    ELSE least(180, degrees(asin(sin(r.km / 6371.0)
                                                 / cos(radians(p.home_lat)))) + 1e-6)
               END AS lng) d
), teaching AS NOT MATERIALIZED (
    -- Every active trainer who teaches the course (or the named one), with whether they are
    -- based inside the box. Inlined where it is used, so that the box bounds the index scan
    -- of `base`.
    SELECT t.id, t.status, t.specialties_norm, t.base_lat, t.base_lng, t.service_radius_km,
           t.rating,
           (t.gender IS NULL OR p.gender IS NULL OR lower(btrim(t.gender)) = p.gender)
               AS gender_ok,
           t.base_lat BETWEEN a.lat_min AND a.lat_max
           AND (a.every_lng OR t.base_lng BETWEEN a.lng_min AND a.lng_max) AS near
    FROM trainers t
    CROSS JOIN purchase p
    CROSS JOIN area a
    -- Two arms an index each serves (the specialty index, the primary key), also in the
    -- generic plan of the prepared statement: a CASE here made that plan scan every trainer.
    WHERE (%(only_trainer)s::uuid IS NULL
           AND t.status = 'active'
           AND t.specialties_norm && array_remove(ARRAY[p.category, p.subcategory], NULL))
       OR t.id = %(only_trainer)s::uuid
), far AS (
    -- Only when asked (count_far: nobody near is eligible, so the sentence names everyone):
    -- the trainers based outside the box, by gender answer. Counting them costs a scan of
    -- every trainer who teaches the course, so an approval does without.
    SELECT gender_ok, count(*) AS trainers
    FROM teaching
    WHERE %(count_far)s::boolean AND %(only_trainer)s::uuid IS NULL AND NOT near
    GROUP BY gender_ok
), base AS MATERIALIZED (
    SELECT t.id AS trainer_id,
           t.status = 'active' AS active,
           CASE WHEN p.category = ANY (t.specialties_norm) THEN 'category'
                WHEN p.subcategory = ANY (t.specialties_norm) THEN 'subcategory' END
               AS specialty_match,
           t.gender_ok,
           kc_haversine_km(p.home_lat, p.home_lng, t.base_lat, t.base_lng) AS distance_km,
           t.service_radius_km::float8 AS service_radius_km,
           t.rating,
           p.home_lat, p.home_lng
    FROM teaching t
    CROSS JOIN purchase p
    -- With count_far the caller has these rows already (a first run found nobody eligible).
    WHERE (t.near OR %(only_trainer)s::uuid IS NOT NULL) AND NOT %(count_far)s::boolean
), counted AS MATERIALIZED (
    -- Capacity is read only for trainers who pass the rules before it (a named trainer:
    -- always).
    SELECT b.*,
           CASE WHEN %(only_trainer)s::uuid IS NOT NULL
                  OR (b.active AND b.specialty_match IS NOT NULL AND b.gender_ok
                      AND b.distance_km <= b.service_radius_km)
           THEN (SELECT count(*) FROM trainer_allocations ta
                  WHERE ta.trainer_id = b.trainer_id AND ta.status = 'approved')
           END AS live_allocations
    FROM base b
), cheap AS MATERIALIZED (
    -- Availability, for those also under capacity.
    SELECT c.*,
           CASE WHEN %(only_trainer)s::uuid IS NOT NULL
                  OR c.live_allocations < kc_trainer_capacity(c.rating)
           THEN (SELECT count(DISTINCT a.weekday)
                   FROM trainer_availability a
                  WHERE a.trainer_id = c.trainer_id
                    AND a.weekday = ANY (%(weekdays)s::smallint[])
                    AND a.slot_start <= %(slot_start)s::time
                    AND a.slot_end >= %(slot_end)s::time
                ) = cardinality(%(weekdays)s::smallint[])
           END AS available
    FROM counted c
), timed AS MATERIALIZED (
    SELECT c.*,
           -- A named trainer (an admin request) is measured on every rule: an override
           -- must know each rule it sets aside.
           CASE WHEN %(only_trainer)s::uuid IS NOT NULL
                  OR (c.active AND c.specialty_match IS NOT NULL AND c.gender_ok
                      AND c.distance_km <= c.service_radius_km
                      AND c.live_allocations < kc_trainer_capacity(c.rating) AND c.available)
           THEN (SELECT count(*)
                   FROM tutoring_sessions ts, bounds b
                  WHERE ts.trainer_id = c.trainer_id
                    AND ts.status = 'scheduled'
                    AND ts.starts_at < b.last_end
                    AND ts.ends_at > b.first_start
                    AND tstzrange(ts.starts_at, ts.ends_at) && b.busy)
           END AS overlapping_sessions
    FROM cheap c
)
-- The columns in the order of CandidateFacts' fields (it is built from them by position).
SELECT t.trainer_id, t.specialty_match, t.gender_ok, t.distance_km, t.service_radius_km,
       t.available, t.overlapping_sessions, t.live_allocations, t.rating,
       -- Sequential distance: the trainer's sessions at a home ending in the hour before a new
       -- session at home or starting in the hour after one must be near this student's home
       -- (an online session on either side needs no travel).
       CASE WHEN t.overlapping_sessions = 0 OR %(only_trainer)s::uuid IS NOT NULL
       THEN (SELECT count(*)
               FROM tutoring_sessions ts
               JOIN students other ON other.id = ts.student_id, bounds b
              WHERE ts.trainer_id = t.trainer_id
                AND ts.status = 'scheduled'
                AND ts.delivery = 'home'
                AND ts.starts_at < b.last_end + interval '1 hour'
                AND ts.ends_at > b.first_start - interval '1 hour'
                AND tstzrange(ts.starts_at, ts.ends_at) && b.near
                AND kc_haversine_km(other.home_lat, other.home_lng, t.home_lat, t.home_lng)
                    > (SELECT s.max_sequential_km FROM kc_settings s))
       END AS far_neighbours,
       t.active,
       1 AS trainers
FROM timed t
UNION ALL
-- Trainers based outside the box, one row per gender answer: active, teaching the course,
-- beyond their radius (distance: infinity). The nil id stands for the group.
SELECT '00000000-0000-0000-0000-000000000000'::uuid, 'category', f.gender_ok,
       'Infinity'::float8, a.km, NULL::boolean, NULL::bigint, NULL::bigint, NULL::numeric,
       NULL::bigint, true, f.trainers
FROM far f
CROSS JOIN area a;

-- name: ranked_candidate_facts
-- Rank first, then check (docs/matching.md, "How the search finds the winner"): the
-- trainers within reach who pass the cheap rules (active, specialty, gender, range) are
-- ranked here, in SQL, by the ranking of matching.CandidateFacts.rank_key (category before
-- subcategory, fewer live allocations, higher rating (NULL as 0), shorter distance, id), and
-- only those at places skip+1 .. skip+take of that ranking are measured on the costly rules,
-- in matching.RULE_ORDER (capacity, then availability and overlaps, then neighbours: a fact
-- is measured only when every rule before the one that reads it passed). The columns are
-- CandidateFacts' fields in their order, then the trainer's place in the ranking and the
-- ranking's length. With skip = 0 it also returns, as group rows (nil id, `trainers` saying
-- how many), the trainers within reach who fail the gender or the range rule: what the full
-- search (candidate_facts) would have counted for them.
WITH purchase AS (
    SELECT s.home_lat, s.home_lng, lower(btrim(s.gender)) AS gender,
           lower(btrim(c.category)) AS category, lower(btrim(c.subcategory)) AS subcategory
    FROM student_course_purchases pu
    JOIN students s ON s.id = pu.student_id
    JOIN courses c ON c.id = pu.course_id
    WHERE pu.id = %(purchase_id)s::uuid
), bounds AS MATERIALIZED (
    SELECT min(t.starts_at) AS first_start, max(t.ends_at) AS last_end,
           range_agg(tstzrange(t.starts_at, t.ends_at)) AS busy,
           range_agg(tstzrange(t.starts_at - interval '1 hour', t.ends_at + interval '1 hour'))
               FILTER (WHERE t.at_home) AS near
    FROM unnest(%(starts)s::timestamptz[], %(ends)s::timestamptz[], %(at_home)s::boolean[])
         AS t(starts_at, ends_at, at_home)
), area AS MATERIALIZED (
    -- The same box as candidate_facts': beyond it no active trainer's radius reaches.
    SELECT p.home_lat - d.lat AS lat_min, p.home_lat + d.lat AS lat_max,
           p.home_lng - d.lng AS lng_min, p.home_lng + d.lng AS lng_max,
           d.lng >= 180 OR abs(p.home_lng) + d.lng > 180 AS every_lng
    FROM purchase p
    CROSS JOIN (SELECT coalesce(max(CASE WHEN status = 'active' THEN service_radius_km END),
                                0)::float8 AS km
                FROM trainers) r
    CROSS JOIN LATERAL (
        SELECT degrees(r.km / 6371.0) + 1e-6 AS lat,
               CASE WHEN sin(r.km / 6371.0) >= cos(radians(p.home_lat)) THEN 180
                    ELSE least(180, degrees(asin(sin(r.km / 6371.0)
                                                 / cos(radians(p.home_lat)))) + 1e-6)
               END AS lng) d
), base AS MATERIALIZED (
    -- Every active trainer based inside the box who teaches the course, with the cheap facts.
    SELECT t.id AS trainer_id,
           CASE WHEN p.category = ANY (t.specialties_norm) THEN 'category'
                WHEN p.subcategory = ANY (t.specialties_norm) THEN 'subcategory' END
               AS specialty_match,
           (t.gender IS NULL OR p.gender IS NULL OR lower(btrim(t.gender)) = p.gender)
               AS gender_ok,
           kc_haversine_km(p.home_lat, p.home_lng, t.base_lat, t.base_lng) AS distance_km,
           t.service_radius_km::float8 AS service_radius_km,
           t.rating,
           p.home_lat, p.home_lng
    FROM trainers t
    CROSS JOIN purchase p
    CROSS JOIN area a
    WHERE t.status = 'active'
      AND t.specialties_norm && array_remove(ARRAY[p.category, p.subcategory], NULL)
      AND t.base_lat BETWEEN a.lat_min AND a.lat_max
      AND (a.every_lng OR t.base_lng BETWEEN a.lng_min AND a.lng_max)
), ranked AS MATERIALIZED (
    -- Those who pass the cheap rules, in the ranking's order. Live allocations are a rule's
    -- fact (capacity) and a ranking key: the database's count (trainer_load, migration 0020:
    -- exact at every committed state; a trainer seeded with triggers off and never
    -- recounted has no row, read as 0), one key lookup each instead of counting rows.
    SELECT r.*,
           row_number() OVER (ORDER BY (r.specialty_match = 'category') DESC,
                                       r.live_allocations,
                                       coalesce(r.rating, 0) DESC,
                                       r.distance_km,
                                       r.trainer_id) AS place,
           count(*) OVER () AS ranked
    FROM (SELECT b.*,
                 coalesce((SELECT l.live_allocations::bigint FROM trainer_load l
                            WHERE l.trainer_id = b.trainer_id), 0) AS live_allocations
          FROM base b
          WHERE b.specialty_match IS NOT NULL AND b.gender_ok
            AND b.distance_km <= b.service_radius_km) r
), picked AS MATERIALIZED (
    SELECT r.*
    FROM ranked r
    WHERE r.place > %(skip)s::bigint AND r.place <= %(skip)s::bigint + %(take)s::bigint
), cheap AS MATERIALIZED (
    -- Availability, for those under capacity.
    SELECT c.*,
           CASE WHEN c.live_allocations < kc_trainer_capacity(c.rating)
           THEN (SELECT count(DISTINCT a.weekday)
                   FROM trainer_availability a
                  WHERE a.trainer_id = c.trainer_id
                    AND a.weekday = ANY (%(weekdays)s::smallint[])
                    AND a.slot_start <= %(slot_start)s::time
                    AND a.slot_end >= %(slot_end)s::time
                ) = cardinality(%(weekdays)s::smallint[])
           END AS available
    FROM picked c
), timed AS MATERIALIZED (
    SELECT c.*,
           CASE WHEN c.available
           THEN (SELECT count(*)
                   FROM tutoring_sessions ts, bounds b
                  WHERE ts.trainer_id = c.trainer_id
                    AND ts.status = 'scheduled'
                    AND ts.starts_at < b.last_end
                    AND ts.ends_at > b.first_start
                    AND tstzrange(ts.starts_at, ts.ends_at) && b.busy)
           END AS overlapping_sessions
    FROM cheap c
)
SELECT t.trainer_id, t.specialty_match, t.gender_ok, t.distance_km, t.service_radius_km,
       t.available, t.overlapping_sessions, t.live_allocations, t.rating,
       CASE WHEN t.overlapping_sessions = 0
       THEN (SELECT count(*)
               FROM tutoring_sessions ts
               JOIN students other ON other.id = ts.student_id, bounds b
              WHERE ts.trainer_id = t.trainer_id
                AND ts.status = 'scheduled'
                AND ts.delivery = 'home'
                AND ts.starts_at < b.last_end + interval '1 hour'
                AND ts.ends_at > b.first_start - interval '1 hour'
                AND tstzrange(ts.starts_at, ts.ends_at) && b.near
                AND kc_haversine_km(other.home_lat, other.home_lng, t.home_lat, t.home_lng)
                    > (SELECT s.max_sequential_km FROM kc_settings s))
       END AS far_neighbours,
       true AS active,
       1 AS trainers,
       t.place,
       t.ranked
FROM timed t
UNION ALL
-- Within reach but out at a cheap rule: one row per rule (gender, then range), counted.
SELECT '00000000-0000-0000-0000-000000000000'::uuid, 'category', NOT g.gender, g.distance,
       0::float8, NULL::boolean, NULL::bigint, NULL::bigint, NULL::numeric, NULL::bigint,
       true, g.trainers, 0::bigint, 0::bigint
FROM (SELECT NOT b.gender_ok AS gender,
             CASE WHEN b.gender_ok THEN 'Infinity'::float8 ELSE 0::float8 END AS distance,
             count(*) AS trainers
      FROM base b
      WHERE %(skip)s::bigint = 0 AND b.specialty_match IS NOT NULL
        AND NOT (b.gender_ok AND b.distance_km <= b.service_radius_km)
      GROUP BY 1, 2) g
ORDER BY place;

-- name: lock_trainer
-- Every approval for a trainer is serialised on this transaction-scoped lock (here and in the
-- capacity trigger). The re-check must be a separate statement: in READ COMMITTED a statement
-- reads the snapshot taken when it started, before it waited for the lock.
SELECT kc_lock_trainer(%(trainer_id)s::uuid);

-- name: try_lock_trainer
-- The same lock, only when no other transaction holds it (false: it is held).
SELECT kc_try_lock_trainer(%(trainer_id)s::uuid) AS locked;

-- name: recheck_trainer
-- Re-reads, after lock_trainer, what may have changed since the search.
WITH locked AS (
    SELECT id, rating, status FROM trainers WHERE id = %(trainer_id)s::uuid
)
SELECT l.status,
       l.rating,
       (SELECT count(*) FROM trainer_allocations ta
         WHERE ta.trainer_id = l.id AND ta.status = 'approved') AS live_allocations,
       (SELECT count(*)
          FROM tutoring_sessions ts
          JOIN unnest(%(starts)s::timestamptz[], %(ends)s::timestamptz[]) AS n(starts_at, ends_at)
            ON ts.starts_at < n.ends_at AND ts.ends_at > n.starts_at
         WHERE ts.trainer_id = l.id AND ts.status = 'scheduled') AS overlapping_sessions
FROM locked l;

-- name: trainer_unscheduled_allocations
-- Approved allocations of a trainer whose sessions are not written yet: their time is
-- already promised, so a new purchase must not take it.
SELECT ta.id, ta.first_session_date, pu.purchase_tier, pu.schedule_mode,
       pu.preferred_time_slot, pu.session_duration_minutes, pu.learning_mode, s.timezone
FROM trainer_allocations ta
JOIN student_course_purchases pu ON pu.id = ta.purchase_id
JOIN students s ON s.id = ta.student_id
WHERE ta.trainer_id = %(trainer_id)s::uuid
  AND ta.status = 'approved'
  AND ta.purchase_id <> %(purchase_id)s::uuid
  AND NOT EXISTS (SELECT 1 FROM tutoring_sessions ts WHERE ts.allocation_id = ta.id);

-- name: insert_allocation
INSERT INTO trainer_allocations (
    purchase_id, student_id, course_id, trainer_id, status, reason, reason_detail, metadata,
    first_session_date, capacity_override, allocated_at)
VALUES (%(purchase_id)s::uuid, %(student_id)s::uuid, %(course_id)s::uuid,
        %(trainer_id)s::uuid, %(status)s::text, %(reason)s::text, %(reason_detail)s::text,
        %(metadata)s::jsonb, %(first_session_date)s::date, %(capacity_override)s::boolean,
        CASE WHEN %(status)s::text = 'approved' THEN now() END)
RETURNING id;

-- name: update_pending_allocation
-- A retry updates the one pending row in place; it never adds another.
UPDATE trainer_allocations
SET trainer_id = %(trainer_id)s::uuid,
    status = %(status)s::text,
    reason = %(reason)s::text,
    reason_detail = %(reason_detail)s::text,
    metadata = %(metadata)s::jsonb,
    first_session_date = %(first_session_date)s::date,
    allocated_at = CASE WHEN %(status)s::text = 'approved' THEN now() END,
    capacity_override = %(capacity_override)s::boolean,
    attempts = attempts + 1,
    updated_at = now()
WHERE id = %(allocation_id)s::uuid AND status = 'pending'
RETURNING id;

-- name: purchase_progress
-- Sessions of a purchase that stand (not cancelled), leaving out (when reassigning) the future
-- of the allocation being replaced. The remaining schedule continues after them and after
-- the live allocation's cancelled sessions (a make-up comes after the session it replaces),
-- as the sessions stage numbers and dates it.
SELECT count(*) FILTER (WHERE ts.status <> 'cancelled') AS delivered,
       coalesce(max(ts.session_number)
                FILTER (WHERE ts.status <> 'cancelled' OR ta.status = 'approved'), 0)
           AS last_number,
       max(ts.scheduled_date) FILTER (WHERE ts.status <> 'cancelled' OR ta.status = 'approved')
           AS last_date
FROM tutoring_sessions ts
JOIN trainer_allocations ta ON ta.id = ts.allocation_id
WHERE ta.purchase_id = %(purchase_id)s::uuid
  AND (ts.allocation_id IS DISTINCT FROM %(replacing)s::uuid OR ts.starts_at <= now());

-- name: open_request
-- At most one (a unique index; assign_trainer supersedes an older open request).
SELECT id, trainer_id, override, note
FROM allocation_requests
WHERE purchase_id = %(purchase_id)s::uuid AND status = 'open'
FOR UPDATE;

-- name: close_request
UPDATE allocation_requests
SET status = %(status)s::text, outcome = %(outcome)s::text, decided_at = now(),
    allocation_id = %(allocation_id)s::uuid
WHERE id = %(request_id)s::bigint;

-- name: replace_allocation
-- Reassignment: the old allocation ends and its future sessions are cancelled; the past stays.
SELECT end_allocation(%(allocation_id)s::uuid, 'reassigned', %(detail)s::text) AS cancelled;

-- name: enqueue_sessions
SELECT enqueue_stage('sessions', %(allocation_id)s::uuid) AS job_id;

-- name: count_allocation_sessions
-- Zero: the sessions stage has not written this allocation yet (cancelled sessions count:
-- an allocation whose every session was cancelled is owed make-ups, not a first schedule).
SELECT count(*) AS n FROM tutoring_sessions
WHERE allocation_id = %(allocation_id)s::uuid;
