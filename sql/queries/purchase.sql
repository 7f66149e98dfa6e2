-- Purchase stage: a succeeded payment becomes one student_course_purchases row.

-- name: lock_payment
-- Locks the payment so duplicate jobs for it run one after the other. The metadata comes as
-- JSON text, and only when it is within the size limit: an oversized payload never reaches
-- the worker (metadata_bytes says how large it is).
SELECT p.id, p.status, p.student_id, p.course_id, s.timezone,
       m.bytes AS metadata_bytes,
       CASE WHEN m.bytes <= %(max_bytes)s::integer THEN p.metadata::text END AS metadata_text,
       (SELECT pu.id FROM student_course_purchases pu WHERE pu.payment_id = p.id) AS purchase_id,
       (SELECT u.purchase_id FROM purchase_upgrades u WHERE u.payment_id = p.id)
           AS upgraded_purchase_id
FROM payments p
JOIN students s ON s.id = p.student_id
CROSS JOIN LATERAL (SELECT octet_length(p.metadata::text) AS bytes) m
WHERE p.id = %(payment_id)s::uuid
FOR UPDATE OF p;

-- name: insert_purchase
-- DO NOTHING on any unique conflict: the caller tells "already active" from the result.
-- The keys the pipeline does not read (named by the caller, at the top level and inside
-- `schedule`) are copied from the payment's metadata as they are.
INSERT INTO student_course_purchases (
    payment_id, student_id, course_id, purchase_tier, start_date, preferred_time_slot,
    schedule_mode, session_duration_minutes, defaults_applied, learning_mode, group_size,
    preferred_trainer_id, unused_metadata, unused_keys)
SELECT p.id, %(student_id)s::uuid, %(course_id)s::uuid, %(tier)s::smallint,
       %(start_date)s::date, %(time_slot)s::time, %(schedule_mode)s::text,
       %(duration)s::smallint, %(defaults_applied)s::text[], %(learning_mode)s::text,
       %(group_size)s::smallint, %(preferred_trainer_id)s::uuid,
       coalesce((SELECT jsonb_object_agg(k, p.metadata -> k)
                 FROM unnest(%(unused_top)s::text[]) AS k), '{}'::jsonb)
       || CASE WHEN cardinality(%(unused_schedule)s::text[]) > 0
               THEN jsonb_build_object('schedule',
                        (SELECT jsonb_object_agg(k, p.metadata -> 'schedule' -> k)
                         FROM unnest(%(unused_schedule)s::text[]) AS k))
               ELSE '{}'::jsonb END,
       %(unused_keys)s::text[]
FROM payments p
WHERE p.id = %(payment_id)s::uuid
ON CONFLICT DO NOTHING
RETURNING id;

-- name: active_purchase_for
SELECT id, payment_id, purchase_tier
FROM student_course_purchases
WHERE student_id = %(student_id)s::uuid AND course_id = %(course_id)s::uuid AND is_active;

-- name: record_rejection
-- The metadata that was rejected is copied here by the database, exactly, unless it is too
-- large or too deep to be read back (keep_metadata false); the payment row keeps all of it.
INSERT INTO payment_rejections (payment_id, reason, errors, metadata)
SELECT p.id, %(reason)s::text, %(errors)s::jsonb,
       CASE WHEN %(keep_metadata)s::boolean THEN p.metadata END
FROM payments p
WHERE p.id = %(payment_id)s::uuid
ON CONFLICT (payment_id) DO UPDATE
SET reason = EXCLUDED.reason,
    errors = EXCLUDED.errors,
    metadata = EXCLUDED.metadata,
    rejections = payment_rejections.rejections + 1,
    rejected_at = now(),
    resolved_at = NULL;

-- name: resolve_rejection
UPDATE payment_rejections SET resolved_at = now()
WHERE payment_id = %(payment_id)s::uuid AND resolved_at IS NULL;

-- name: lock_active_purchase
SELECT id, purchase_tier, learning_mode FROM student_course_purchases
WHERE student_id = %(student_id)s::uuid AND course_id = %(course_id)s::uuid AND is_active
FOR UPDATE;

-- name: apply_upgrade
-- The tier trigger enqueues the allocation stage for the extra sessions.
WITH recorded AS (
    INSERT INTO purchase_upgrades (payment_id, purchase_id, from_tier, to_tier)
    VALUES (%(payment_id)s::uuid, %(purchase_id)s::uuid, %(from_tier)s::smallint,
            %(to_tier)s::smallint)
    RETURNING purchase_id
)
UPDATE student_course_purchases pu SET purchase_tier = %(to_tier)s::smallint
FROM recorded WHERE pu.id = recorded.purchase_id;
