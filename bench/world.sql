-- A realistic world for benchmarks, generated set-based. Parameters (psql-style, set by the
-- caller with SET kc.*): kc.trainers, kc.students, kc.booked_allocations (each with 20
-- sessions). Deterministic: the same parameters give the same rows (setseed).
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

-- Trainers around Bengaluru (~25 km box), two specialties each, weekly availability.
INSERT INTO trainers (full_name, gender, rating, specialties, base_lat, base_lng,
                      service_radius_km, status)
SELECT 'Trainer ' || i,
       CASE WHEN i % 3 = 0 THEN 'female' WHEN i % 3 = 1 THEN 'male' END,
       round((3.1 + random() * 1.9)::numeric, 1),
       ARRAY[(ARRAY['AI', 'Robotics', 'Coding', 'App Making', 'Video Making'])[1 + i % 5],
             (ARRAY['Python', 'Arduino', 'Flutter', 'Machine Learning', 'Coding'])[1 + (i / 5) % 5]],
       12.85 + random() * 0.25, 77.45 + random() * 0.3,
       8 + (i % 5) * 2, 'active'
FROM generate_series(1, current_setting('kc.trainers')::int) AS i;

INSERT INTO trainer_availability (trainer_id, weekday, slot_start, slot_end)
SELECT t.id, d, time '07:00', time '21:00'
FROM trainers t CROSS JOIN generate_series(1, 7) AS d;

INSERT INTO students (full_name, gender, home_lat, home_lng)
SELECT 'Student ' || i, CASE WHEN i % 2 = 0 THEN 'female' END,
       12.85 + random() * 0.25, 77.45 + random() * 0.3
FROM generate_series(1, current_setting('kc.students')::int) AS i;

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

ANALYZE;
