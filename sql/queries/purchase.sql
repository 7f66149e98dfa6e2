-- Purchase stage: a succeeded payment becomes one student_course_purchases row.

-- name: lock_payments
-- Locks a batch's payments (in id order: two workers never wait on each other in a circle),
-- so duplicate jobs for one payment run one after the other. The metadata comes as
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
WHERE p.id = ANY (%(payment_ids)s::uuid[])
ORDER BY p.id
FOR UPDATE OF p;

-- name: insert_purchases
-- A batch's new purchases in one statement. DO NOTHING on any unique conflict: the caller
-- tells "already active" from the rows returned. `names` carries, per payment, the lists of
-- names (defaults applied; keys the pipeline does not read, at the top level and inside
-- `schedule`, copied from the payment's metadata as they are; all unread keys).
INSERT INTO student_course_purchases (
    payment_id, student_id, course_id, purchase_tier, start_date, preferred_time_slot,
    schedule_mode, session_duration_minutes, defaults_applied, learning_mode, group_size,
    preferred_trainer_id, unused_metadata, unused_keys)
SELECT p.id, p.student_id, p.course_id, n.tier, n.start_date, n.time_slot, n.schedule_mode,
       n.duration, ARRAY(SELECT jsonb_array_elements_text(n.names -> 'defaults')),
       n.learning_mode, n.group_size, n.preferred_trainer_id,
       coalesce((SELECT jsonb_object_agg(k, p.metadata -> k)
                 FROM jsonb_array_elements_text(n.names -> 'top') AS k), '{}'::jsonb)
       || CASE WHEN jsonb_array_length(n.names -> 'schedule') > 0
               THEN jsonb_build_object('schedule',
                        (SELECT jsonb_object_agg(k, p.metadata -> 'schedule' -> k)
                         FROM jsonb_array_elements_text(n.names -> 'schedule') AS k))
               ELSE '{}'::jsonb END,
       ARRAY(SELECT jsonb_array_elements_text(n.names -> 'keys'))
FROM unnest(%(payment_ids)s::uuid[], %(tiers)s::smallint[], %(start_dates)s::date[],
            %(time_slots)s::time[], %(schedule_modes)s::text[], %(durations)s::smallint[],
            %(learning_modes)s::text[], %(group_sizes)s::smallint[],
            %(preferred_trainer_ids)s::uuid[], %(names)s::jsonb[])
     AS n(payment_id, tier, start_date, time_slot, schedule_mode, duration, learning_mode,
          group_size, preferred_trainer_id, names)
JOIN payments p ON p.id = n.payment_id
ON CONFLICT DO NOTHING
RETURNING id, payment_id;

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

-- name: resolve_rejections
UPDATE payment_rejections SET resolved_at = now()
WHERE payment_id = ANY (%(payment_ids)s::uuid[]) AND resolved_at IS NULL;

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
