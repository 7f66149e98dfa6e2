-- 0008: what the real app sends with a payment, in typed columns.
--   * learning_mode: 'home' (every session at the student's home) or 'hybrid' (exactly 30
--     sessions: 1-6 online, then alternating from 7, online first: 18 online, 12 at home);
--   * group_size: 1 to 3 students (shown, not used by matching: a payment names one student);
--   * preferred_trainer_id: the trainer the student picked in the app, tried first; not a
--     foreign key, since an unknown id is recorded, not refused;
--   * unused_metadata / unused_keys: the keys of the payment's metadata the pipeline does not
--     read, kept for display and listed, so nothing is dropped silently;
--   * tutoring_sessions.delivery: where each session happens, 'home' or 'online'; the
--     database checks it against the purchase's learning mode and the session's number.

ALTER TABLE student_course_purchases
    ADD COLUMN learning_mode text NOT NULL DEFAULT 'home'
        CHECK (learning_mode IN ('home', 'hybrid')),
    ADD COLUMN group_size smallint NOT NULL DEFAULT 1 CHECK (group_size BETWEEN 1 AND 3),
    ADD COLUMN preferred_trainer_id uuid,
    ADD COLUMN unused_metadata jsonb NOT NULL DEFAULT '{}'
        CHECK (jsonb_typeof(unused_metadata) = 'object'),
    ADD COLUMN unused_keys text[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT student_course_purchases_hybrid_is_30
        CHECK (learning_mode <> 'hybrid' OR purchase_tier = 30);

ALTER TABLE tutoring_sessions
    ADD COLUMN delivery text NOT NULL DEFAULT 'home' CHECK (delivery IN ('home', 'online'));

-- Where session p_number of a course happens (workers.schedule.delivery_for in Python; a test
-- keeps the two in step).
CREATE FUNCTION kc_session_delivery(p_learning_mode text, p_number integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
AS $$
    SELECT CASE
        WHEN p_learning_mode = 'home' THEN 'home'
        WHEN p_number <= 6 OR (p_number - 6) % 2 = 1 THEN 'online'
        ELSE 'home'
    END
$$;

-- The last line of defence for the hybrid split: a session's delivery follows its number.
CREATE FUNCTION trg_sessions_check_delivery() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    v_mode text;
BEGIN
    SELECT pu.learning_mode INTO v_mode
    FROM trainer_allocations ta
    JOIN student_course_purchases pu ON pu.id = ta.purchase_id
    WHERE ta.id = NEW.allocation_id;
    IF NEW.delivery IS DISTINCT FROM kc_session_delivery(v_mode, NEW.session_number) THEN
        RAISE EXCEPTION 'session % of a % course is %, not %', NEW.session_number, v_mode,
            kc_session_delivery(v_mode, NEW.session_number), NEW.delivery
            USING ERRCODE = 'check_violation', CONSTRAINT = 'tutoring_sessions_delivery';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tutoring_sessions_check_delivery
    BEFORE INSERT OR UPDATE OF delivery, session_number, allocation_id ON tutoring_sessions
    FOR EACH ROW EXECUTE FUNCTION trg_sessions_check_delivery();

-- The trace shows the new typed fields (appended: a view keeps its columns' order).
CREATE OR REPLACE VIEW purchase_trace AS
SELECT p.id AS payment_id, p.student_id, p.course_id, p.status AS payment_status,
       p.updated_at AS payment_at,
       pj.status AS purchase_job, pj.starts AS purchase_attempts, pe.error AS purchase_error,
       rj.reason AS rejected_reason, rj.errors AS rejected_errors,
       pu.id AS purchase_id, pu.created_at AS purchase_at, pu.purchase_tier, pu.is_active,
       aj.status AS allocation_job, aj.starts AS allocation_attempts, ae.error AS allocation_error,
       ta.id AS allocation_id, ta.status AS allocation_status, ta.trainer_id,
       ta.reason AS allocation_reason, ta.reason_detail AS allocation_reason_detail,
       ta.attempts AS allocation_tries, ta.allocated_at,
       sj.status AS sessions_job, sj.starts AS sessions_attempts, se.error AS sessions_error,
       ss.written AS sessions_written, ss.first_at AS first_session_at,
       ss.written_at AS sessions_at,
       pu.learning_mode, pu.group_size, pu.preferred_trainer_id,
       ta.metadata -> 'preferredTrainer' ->> 'outcome' AS preferred_trainer_outcome,
       pu.defaults_applied, pu.unused_keys
FROM payments p
LEFT JOIN student_course_purchases pu ON pu.payment_id = p.id
LEFT JOIN payment_rejections rj ON rj.payment_id = p.id AND rj.resolved_at IS NULL
LEFT JOIN LATERAL (
    SELECT * FROM trainer_allocations a WHERE a.purchase_id = pu.id
    ORDER BY (a.status IN ('pending', 'approved')) DESC, a.created_at DESC LIMIT 1
) ta ON true
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE s.status <> 'cancelled') AS written,
           min(s.starts_at) FILTER (WHERE s.status <> 'cancelled') AS first_at,
           max(s.created_at) AS written_at
    FROM tutoring_sessions s
    JOIN trainer_allocations a2 ON a2.id = s.allocation_id
    WHERE a2.purchase_id = pu.id
) ss ON pu.id IS NOT NULL
LEFT JOIN stage_jobs pj ON pj.stage = 'purchase' AND pj.ref_id = p.id
LEFT JOIN stage_jobs aj ON aj.stage = 'allocation' AND aj.ref_id = pu.id
LEFT JOIN stage_jobs sj ON sj.stage = 'sessions' AND sj.ref_id = ta.id
LEFT JOIN stage_last_error pe ON pe.stage = 'purchase' AND pe.ref_id = p.id
     AND pe.at >= p.updated_at
LEFT JOIN stage_last_error ae ON ae.stage = 'allocation' AND ae.ref_id = pu.id
     AND ae.at >= pu.created_at
LEFT JOIN stage_last_error se ON se.stage = 'sessions' AND se.ref_id = ta.id
     AND se.at >= ta.created_at;
