-- 0003 lifecycle: upgrades, refunds, healing.

ALTER TABLE stage_history
    DROP CONSTRAINT stage_history_event_check,
    ADD CONSTRAINT stage_history_event_check CHECK (event IN (
        'enqueued', 'succeeded', 'skipped', 'rejected', 'failed', 'replayed', 'healed',
        'refunded'));

-- An upgrade payment raises the tier of an existing purchase; one row per upgrade payment
-- makes the purchase stage idempotent for it (the purchase keeps its original payment_id).
CREATE TABLE purchase_upgrades (
    payment_id  uuid PRIMARY KEY REFERENCES payments (id),
    purchase_id uuid NOT NULL REFERENCES student_course_purchases (id),
    from_tier   smallint NOT NULL,
    to_tier     smallint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    reverted_at timestamptz,
    CHECK (to_tier > from_tier)
);
CREATE INDEX purchase_upgrades_purchase_idx ON purchase_upgrades (purchase_id);

-- A raised tier asks the allocation stage for the extra sessions (same trainer when free).
CREATE FUNCTION trg_purchases_tier_raised() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.is_active AND NEW.purchase_tier > OLD.purchase_tier THEN
        PERFORM enqueue_stage('allocation', NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER student_course_purchases_tier_raised
AFTER UPDATE OF purchase_tier ON student_course_purchases
FOR EACH ROW EXECUTE FUNCTION trg_purchases_tier_raised();

-- A refund takes effect in the refunding transaction itself:
--  * the purchase's own payment: the purchase is deactivated, its live allocation cancelled
--    (reason 'refunded') and its future sessions cancelled; past sessions stay as they were;
--  * an upgrade payment: the tier goes back and the extra future sessions are cancelled.
-- Cancelling frees capacity and time, so waiting purchases are retried by their triggers.
CREATE FUNCTION apply_refund(p_payment uuid) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v_purchase uuid;
    v_upgrade  purchase_upgrades%ROWTYPE;
    v_detail   text;
BEGIN
    SELECT id INTO v_purchase FROM student_course_purchases
    WHERE payment_id = p_payment AND is_active FOR UPDATE;
    IF FOUND THEN
        UPDATE student_course_purchases SET is_active = false, deactivated_at = now()
        WHERE id = v_purchase;
        UPDATE trainer_allocations
        SET status = 'cancelled', reason = 'refunded', updated_at = now(),
            reason_detail = 'the payment was refunded'
        WHERE purchase_id = v_purchase AND status IN ('pending', 'approved');
        UPDATE tutoring_sessions ts SET status = 'cancelled', cancelled_at = now()
        FROM trainer_allocations ta
        WHERE ta.id = ts.allocation_id AND ta.purchase_id = v_purchase
          AND ts.status = 'scheduled' AND ts.starts_at > now();
        UPDATE allocation_requests SET status = 'refused', outcome = 'the payment was refunded',
                                       decided_at = now()
        WHERE purchase_id = v_purchase AND status = 'open';
        v_detail := 'purchase ' || v_purchase || ' deactivated';
    ELSE
        SELECT * INTO v_upgrade FROM purchase_upgrades
        WHERE payment_id = p_payment AND reverted_at IS NULL FOR UPDATE;
        IF NOT FOUND THEN
            v_detail := 'nothing to undo: no active purchase or upgrade for this payment';
        ELSE
            UPDATE purchase_upgrades SET reverted_at = now() WHERE payment_id = p_payment;
            UPDATE student_course_purchases
            SET purchase_tier = purchase_tier - (v_upgrade.to_tier - v_upgrade.from_tier)
            WHERE id = v_upgrade.purchase_id;
            UPDATE tutoring_sessions ts SET status = 'cancelled', cancelled_at = now()
            FROM trainer_allocations ta
            WHERE ta.id = ts.allocation_id AND ta.purchase_id = v_upgrade.purchase_id
              AND ts.status = 'scheduled' AND ts.starts_at > now()
              AND ts.session_number > (SELECT purchase_tier FROM student_course_purchases
                                       WHERE id = v_upgrade.purchase_id);
            v_detail := 'upgrade of purchase ' || v_upgrade.purchase_id || ' reverted to '
                        || v_upgrade.from_tier || ' sessions';
        END IF;
    END IF;
    INSERT INTO stage_history (stage, ref_id, event, detail)
    VALUES ('purchase', p_payment, 'refunded', v_detail);
    RETURN v_detail;
END
$$;

CREATE FUNCTION trg_payments_refunded() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.status = 'refunded' AND OLD.status IS DISTINCT FROM 'refunded' THEN
        PERFORM apply_refund(NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER payments_refunded
AFTER UPDATE OF status ON payments
FOR EACH ROW EXECUTE FUNCTION trg_payments_refunded();

-- Live jobs (queued or running) per stage and row: the healer leaves those alone.
CREATE VIEW live_jobs AS
SELECT id AS job_id, entrypoint AS stage,
       substr(dedupe_key, length(entrypoint) + 2)::uuid AS ref_id, status, attempts
FROM pgqueuer
WHERE status IN ('queued', 'picked') AND dedupe_key IS NOT NULL;

-- Healing: every row whose next stage is missing, whose job is not live and has not failed
-- (failed jobs wait for an operator's replay), older than p_min_age, gets its job again.
-- Returns what it enqueued; each is recorded in stage_history as 'healed'.
CREATE FUNCTION heal_pipeline(p_min_age interval DEFAULT interval '2 minutes')
RETURNS TABLE (stage text, ref_id uuid)
LANGUAGE sql
AS $$
    WITH held AS (
        SELECT entrypoint AS stage, substr(dedupe_key, length(entrypoint) + 2)::uuid AS ref_id
        FROM pgqueuer WHERE dedupe_key IS NOT NULL
    ), missing AS (
        -- a succeeded payment with no purchase, no open rejection and no upgrade record
        SELECT 'purchase' AS stage, p.id AS ref_id
        FROM payments p
        WHERE p.status = 'succeeded' AND p.updated_at < now() - p_min_age
          AND NOT EXISTS (SELECT 1 FROM student_course_purchases pu WHERE pu.payment_id = p.id)
          AND NOT EXISTS (SELECT 1 FROM purchase_upgrades u WHERE u.payment_id = p.id)
          AND NOT EXISTS (SELECT 1 FROM payment_rejections r
                          WHERE r.payment_id = p.id AND r.resolved_at IS NULL)
        UNION ALL
        -- an active purchase with no live allocation, or approved but short of sessions
        SELECT 'allocation', pu.id
        FROM student_course_purchases pu
        WHERE pu.is_active AND pu.created_at < now() - p_min_age
          AND (NOT EXISTS (SELECT 1 FROM trainer_allocations ta
                           WHERE ta.purchase_id = pu.id AND ta.status IN ('pending', 'approved'))
               OR EXISTS (SELECT 1 FROM trainer_allocations ta
                          WHERE ta.purchase_id = pu.id AND ta.status = 'approved'
                            AND ta.allocated_at < now() - p_min_age
                            AND EXISTS (SELECT 1 FROM tutoring_sessions ts
                                        WHERE ts.allocation_id = ta.id)
                            AND (SELECT count(*) FROM tutoring_sessions ts
                                 JOIN trainer_allocations a2 ON a2.id = ts.allocation_id
                                 WHERE a2.purchase_id = pu.id AND ts.status <> 'cancelled')
                                < pu.purchase_tier))
        UNION ALL
        -- an approved allocation without any session
        SELECT 'sessions', ta.id
        FROM trainer_allocations ta
        WHERE ta.status = 'approved' AND ta.allocated_at < now() - p_min_age
          AND NOT EXISTS (SELECT 1 FROM tutoring_sessions ts WHERE ts.allocation_id = ta.id)
    )
    , todo AS MATERIALIZED (
        SELECT m.stage, m.ref_id
        FROM missing m
        WHERE NOT EXISTS (SELECT 1 FROM held h WHERE h.stage = m.stage AND h.ref_id = m.ref_id)
    )
    SELECT t.stage, t.ref_id
    FROM todo t
    CROSS JOIN LATERAL (SELECT enqueue_stage(t.stage, t.ref_id, 'healed')) AS enqueued
$$;

CREATE VIEW healed_rows AS
SELECT stage, ref_id, job_id, at
FROM stage_history
WHERE event = 'healed';
