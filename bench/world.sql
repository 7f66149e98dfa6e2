-- A realistic world for benchmarks, generated set-based. Parameters (psql-style, set by the
-- caller with SET kc.*): kc.trainers, kc.students, kc.booked_allocations (each with 20
-- sessions). Deterministic: the same parameters give the same rows (setseed).
-- The generators of trainers and students are functions in the schema `bench`, so that each
-- benchmark phase's district (bench/district.sql) adds people of the same kind.
CREATE SCHEMA IF NOT EXISTS bench;

-- Trainers in a box (two specialties each, every day 07:00-21:00); returns their ids.
CREATE FUNCTION bench.add_trainers(p_label text, p_count int, p_lat float8, p_lng float8,
                                   p_dlat float8, p_dlng float8)
RETURNS SETOF uuid LANGUAGE sql AS $$
    WITH t AS (
        INSERT INTO trainers (full_name, gender, rating, specialties, base_lat, base_lng,
                              service_radius_km, status)
        SELECT 'Trainer ' || p_label || i,
               CASE WHEN i % 3 = 0 THEN 'female' WHEN i % 3 = 1 THEN 'male' END,
               round((3.1 + random() * 1.9)::numeric, 1),
               ARRAY[(ARRAY['AI', 'Robotics', 'Coding', 'App Making', 'Video Making'])[1 + i % 5],
                     (ARRAY['Python', 'Arduino', 'Flutter', 'Machine Learning', 'Coding'])
                         [1 + (i / 5) % 5]],
               p_lat + random() * p_dlat, p_lng + random() * p_dlng,
               8 + (i % 5) * 2, 'active'
        FROM generate_series(1, p_count) AS i
        RETURNING id
    ), a AS (
        INSERT INTO trainer_availability (trainer_id, weekday, slot_start, slot_end)
        SELECT t.id, d, time '07:00', time '21:00' FROM t CROSS JOIN generate_series(1, 7) AS d
    )
    SELECT id FROM t
$$;

-- Students in a box (half of them female, the others without a gender); returns
-- (n, id), n = 1..p_count in the order they were made.
CREATE FUNCTION bench.add_students(p_label text, p_count int, p_lat float8, p_lng float8,
                                   p_dlat float8, p_dlng float8)
RETURNS TABLE (n int, id uuid) LANGUAGE sql AS $$
    WITH made AS (
        SELECT i, gen_random_uuid() AS id, CASE WHEN i % 2 = 0 THEN 'female' END AS gender,
               p_lat + random() * p_dlat AS lat, p_lng + random() * p_dlng AS lng
        FROM generate_series(1, p_count) AS i
    ), ins AS (
        INSERT INTO students (id, full_name, gender, home_lat, home_lng)
        SELECT id, 'Student ' || p_label || i, gender, lat, lng FROM made
    )
    SELECT i, id FROM made
$$;

-- Each pipeline phase's orders (bench/district.sql): who pays for what, by the phase's own
-- numbering n (the payment's metadata varies with n).
CREATE TABLE bench.orders (
    phase text NOT NULL,
    n integer NOT NULL,
    payment_id uuid NOT NULL UNIQUE,
    student_id uuid NOT NULL,
    course_id uuid NOT NULL,
    PRIMARY KEY (phase, n)
);

-- The rows a phase's payments made (their payments, purchases and allocations): the
-- stage_history and job_starts ref_id of the phase's own jobs. One SELECT, STABLE: inlined.
CREATE FUNCTION bench.own_refs(p_phase text) RETURNS SETOF uuid LANGUAGE sql STABLE AS $$
    SELECT o.payment_id FROM bench.orders o WHERE o.phase = p_phase
    UNION ALL
    SELECT pu.id FROM bench.orders o
    JOIN student_course_purchases pu ON pu.payment_id = o.payment_id
    WHERE o.phase = p_phase
    UNION ALL
    SELECT ta.id FROM bench.orders o
    JOIN student_course_purchases pu ON pu.payment_id = o.payment_id
    JOIN trainer_allocations ta ON ta.purchase_id = pu.id
    WHERE o.phase = p_phase
$$;

SELECT setseed(0.42);

INSERT INTO courses (title, category, subcategory)
SELECT c.title, c.category, c.subcategory
FROM (VALUES ('AI Foundations', 'AI', 'Machine Learning'),
             ('Robotics Lab', 'Robotics', 'Arduino'),
             ('Coding Basics', 'Coding', 'Python'),
             ('App Making', 'App Making', 'Flutter'),
             ('Video Making', 'Video Making', NULL),
             ('Game Coding', 'Coding', 'Games'),
             ('Drone Robotics', 'Robotics', 'Drones'),
             ('Generative AI', 'AI', 'Generative')) AS c(title, category, subcategory);

INSERT INTO holidays (day, reason)
SELECT d::date, 'benchmark holiday'
FROM generate_series(current_date + 10, current_date + 400, interval '37 days') AS d;

-- Around Bengaluru (~25 km box).
SELECT count(*) FROM bench.add_trainers('', current_setting('kc.trainers')::int,
                                        12.85, 77.45, 0.25, 0.3);
SELECT count(*) FROM bench.add_students('', current_setting('kc.students')::int,
                                        12.85, 77.45, 0.25, 0.3);

-- Booked history: purchases already allocated and scheduled, written without triggers
-- (session_replication_role = replica, set by the caller) and without overlaps: allocation k
-- of a trainer teaches at hour 8 + 2k, daily, 20 sessions from tomorrow. Each booking obeys
-- the matching rules (a course of the trainer's first specialty, the student's home within
-- 2 km of the trainer's base, no gender conflict), so the lifecycle job finds nothing to move.
CREATE TEMP TABLE bench_booked AS
SELECT gen_random_uuid() AS payment_id, gen_random_uuid() AS purchase_id,
       gen_random_uuid() AS allocation_id, s.id AS student_id, t.id AS trainer_id,
       (SELECT c.id FROM courses c WHERE c.category = t.specialties[1] ORDER BY c.title LIMIT 1)
           AS course_id,
       make_time(8 + 2 * k, 0, 0) AS slot
FROM (SELECT id, specialties, row_number() OVER (ORDER BY id) AS rn FROM trainers) t
CROSS JOIN generate_series(0, 4) AS k
JOIN (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM students) s
  ON s.rn = (t.rn - 1) * 5 + k + 1
WHERE (t.rn - 1) * 5 + k < current_setting('kc.booked_allocations')::int;

UPDATE students s
SET home_lat = t.base_lat + (random() - 0.5) * 0.02,
    home_lng = t.base_lng + (random() - 0.5) * 0.02,
    gender = coalesce(t.gender, s.gender)
FROM bench_booked b JOIN trainers t ON t.id = b.trainer_id
WHERE s.id = b.student_id;

INSERT INTO payments (id, student_id, course_id, amount_cents, status, metadata, confirmed_at)
SELECT payment_id, student_id, course_id, 499900, 'succeeded', '{"sessionCount": 20}', now()
FROM bench_booked;

INSERT INTO student_course_purchases (id, payment_id, student_id, course_id, purchase_tier,
    start_date, preferred_time_slot, schedule_mode, session_duration_minutes)
SELECT purchase_id, payment_id, student_id, course_id, 20, current_date + 1, slot, 'daily', 60
FROM bench_booked;

INSERT INTO trainer_allocations (id, purchase_id, student_id, course_id, trainer_id, status,
    metadata, first_session_date, allocated_at)
SELECT allocation_id, purchase_id, student_id, course_id, trainer_id, 'approved', '{}',
       current_date + 1, now()
FROM bench_booked;

INSERT INTO tutoring_sessions (allocation_id, session_number, student_id, trainer_id, course_id,
    scheduled_date, scheduled_time, starts_at, ends_at, duration_minutes)
SELECT b.allocation_id, n, b.student_id, b.trainer_id, b.course_id,
       current_date + n, b.slot,
       ((current_date + n) + b.slot) AT TIME ZONE 'Asia/Kolkata',
       ((current_date + n) + b.slot) AT TIME ZONE 'Asia/Kolkata' + interval '60 minutes', 60
FROM bench_booked b CROSS JOIN generate_series(1, 20) AS n;

-- Written with triggers off: each trainer's live allocations are counted once here (0020).
SELECT kc_recount_trainer_load();

ANALYZE;
