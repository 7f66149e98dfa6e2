-- One benchmark phase's district: new trainers and new students in a box of their own, and
-- the phase's orders (who will pay for what), made set-based before the phase starts.
-- Parameters (set by bench/world.py with set_config): kc.phase, kc.payments, kc.trainers,
-- kc.side_km (the box's side), kc.seed (setseed: the same phase gives the same rows).
--
-- The box lies north of every trainer so far, 0.5 degrees (55 km) beyond the northernmost,
-- so no earlier trainer (radius at most 16 km) reaches its students and no trainer of it
-- reaches theirs: each phase allocates in its own district only, at the density of the
-- fixed world (bench/world.sql).
SELECT setseed(current_setting('kc.seed')::float8);

CREATE TEMP TABLE district ON COMMIT DROP AS
SELECT lat, 76.0::float8 AS lng,
       current_setting('kc.side_km')::float8 / 111.2 AS dlat,
       current_setting('kc.side_km')::float8 / (111.2 * cos(radians(lat))) AS dlng
FROM (SELECT greatest(14.0, max(base_lat) + 0.5) AS lat FROM trainers) north;

SELECT count(*)
FROM district d,
     bench.add_trainers(current_setting('kc.phase') || ' ', current_setting('kc.trainers')::int,
                        d.lat, d.lng, d.dlat, d.dlng);

-- One order per new student; the course is spread evenly by a hash of (phase, n), so it is
-- independent of the metadata, which varies with n (bench/pipeline.py: NEW_PAYMENTS).
INSERT INTO bench.orders (phase, n, payment_id, student_id, course_id)
SELECT current_setting('kc.phase'), s.n, gen_random_uuid(), s.id,
       courses.ids[1 + abs(hashtext(current_setting('kc.phase') || ':' || s.n))
                       % cardinality(courses.ids)]
FROM district d,
     bench.add_students(current_setting('kc.phase') || ' ', current_setting('kc.payments')::int,
                        d.lat, d.lng, d.dlat, d.dlng) AS s,
     (SELECT array_agg(id ORDER BY title) AS ids FROM courses) AS courses;
