-- 0020: each trainer's live (approved) allocations, counted by the database (issue 25), so
-- that the allocation stage's search ranks trainers and applies the capacity rule without
-- counting allocation rows for each candidate.
--
-- A table of its own, not a column of `trainers`: only this counter's own settling ever
-- locks its rows, so it can add no lock cycle with anything that locks trainers (admins'
-- changes and their triggers) or trainers' advisory locks (docs/allocation-under-scarcity.md).
-- The counts are settled when the transaction commits (a deferred constraint trigger), every
-- touched trainer's row locked in trainer-id order, then recounted from the allocations:
--   * a transaction never holds a counter row while it waits for a trainer's advisory lock
--     (the allocation stage takes those one at a time before it commits; a move ends the old
--     allocation first, and that row lock used to be held while the next trainer was waited
--     for: two moves in opposite directions would have deadlocked);
--   * two commits that touch the same trainers take their rows in the same order;
--   * recounting (not adding +1/-1) after the lock: the statement sees every commit before
--     it, so the last commit to touch a trainer leaves the exact count.
-- So at every committed state the counter equals count(*) of the trainer's approved
-- allocations (tests/test_trainer_load.py). Inside a transaction it lags that transaction's
-- own changes until commit: the capacity trigger and the stage's re-check under the
-- trainer's lock still count rows, and they decide.

CREATE TABLE trainer_load (
    trainer_id       uuid PRIMARY KEY REFERENCES trainers (id) ON DELETE CASCADE,
    live_allocations integer NOT NULL DEFAULT 0 CHECK (live_allocations >= 0)
);
COMMENT ON TABLE trainer_load IS
    'Approved allocations per trainer, settled at each commit that changes them (0020).';

INSERT INTO trainer_load (trainer_id, live_allocations)
SELECT t.id, (SELECT count(*) FROM trainer_allocations ta
               WHERE ta.trainer_id = t.id AND ta.status = 'approved')
FROM trainers t;

-- Every trainer has a row from the start (settling then only updates).
CREATE FUNCTION trg_trainers_load_row() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    INSERT INTO trainer_load (trainer_id)
    SELECT n.id FROM new_trainers n
    ON CONFLICT (trainer_id) DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER trainers_load_row
    AFTER INSERT ON trainers REFERENCING NEW TABLE AS new_trainers
    FOR EACH STATEMENT EXECUTE FUNCTION trg_trainers_load_row();

-- Immediate, once per statement: remember (in a transaction-local setting, which a
-- rolled-back savepoint restores) every trainer whose approved allocations the statement
-- changed.
CREATE FUNCTION kc_load_touch(p_trainers uuid[]) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    IF cardinality(p_trainers) = 0 THEN
        RETURN;
    END IF;
    PERFORM set_config(
        'kc.load_touched',
        array_to_string(ARRAY(
            SELECT DISTINCT t
            FROM unnest(string_to_array(nullif(current_setting('kc.load_touched', true), ''),
                                        ',')
                        || p_trainers::text[]) t
            WHERE t IS NOT NULL), ','),
        true);
END
$$;

CREATE FUNCTION trg_allocations_load_touch() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM kc_load_touch(ARRAY(SELECT DISTINCT n.trainer_id FROM new_allocations n
                                    WHERE n.status = 'approved' AND n.trainer_id IS NOT NULL));
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM kc_load_touch(ARRAY(SELECT DISTINCT o.trainer_id FROM old_allocations o
                                    WHERE o.status = 'approved' AND o.trainer_id IS NOT NULL));
    ELSE
        PERFORM kc_load_touch(ARRAY(
            SELECT DISTINCT t
            FROM old_allocations o
            JOIN new_allocations n ON n.id = o.id
            CROSS JOIN LATERAL (VALUES (CASE WHEN o.status = 'approved' THEN o.trainer_id END),
                                       (CASE WHEN n.status = 'approved' THEN n.trainer_id END))
                 v(t)
            WHERE t IS NOT NULL
              AND (o.status IS DISTINCT FROM n.status
                   OR o.trainer_id IS DISTINCT FROM n.trainer_id)));
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER trainer_allocations_load_touch_inserted
    AFTER INSERT ON trainer_allocations REFERENCING NEW TABLE AS new_allocations
    FOR EACH STATEMENT EXECUTE FUNCTION trg_allocations_load_touch();
CREATE TRIGGER trainer_allocations_load_touch_updated
    AFTER UPDATE ON trainer_allocations
    REFERENCING OLD TABLE AS old_allocations NEW TABLE AS new_allocations
    FOR EACH STATEMENT EXECUTE FUNCTION trg_allocations_load_touch();
CREATE TRIGGER trainer_allocations_load_touch_deleted
    AFTER DELETE ON trainer_allocations REFERENCING OLD TABLE AS old_allocations
    FOR EACH STATEMENT EXECUTE FUNCTION trg_allocations_load_touch();

-- At commit: the first of the transaction's deferred events settles every trainer it
-- touched (the others find nothing left to do).
CREATE FUNCTION trg_allocations_load_settle() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_touched uuid[];
BEGIN
    v_touched := ARRAY(SELECT DISTINCT t::uuid
                       FROM unnest(string_to_array(
                                nullif(current_setting('kc.load_touched', true), ''), ',')) t
                       ORDER BY 1);
    IF cardinality(v_touched) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('kc.load_touched', '', true);
    -- Trainers created in this transaction before 0020's trigger existed have no row yet.
    INSERT INTO trainer_load (trainer_id)
    SELECT t FROM unnest(v_touched) t
    WHERE EXISTS (SELECT 1 FROM trainers WHERE id = t)
    ORDER BY 1
    ON CONFLICT (trainer_id) DO NOTHING;
    PERFORM 1 FROM trainer_load WHERE trainer_id = ANY (v_touched)
    ORDER BY trainer_id FOR UPDATE;
    -- A statement of its own after the locks: it sees every commit that held them before.
    UPDATE trainer_load l
    SET live_allocations = (SELECT count(*) FROM trainer_allocations ta
                            WHERE ta.trainer_id = l.trainer_id AND ta.status = 'approved')
    WHERE l.trainer_id = ANY (v_touched);
    RETURN NULL;
END
$$;
-- Constraint triggers are per row: only the rows that change someone's count queue one.
CREATE CONSTRAINT TRIGGER trainer_allocations_load_settle_inserted
    AFTER INSERT ON trainer_allocations
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.status = 'approved')
    EXECUTE FUNCTION trg_allocations_load_settle();
CREATE CONSTRAINT TRIGGER trainer_allocations_load_settle_updated
    AFTER UPDATE OF status, trainer_id ON trainer_allocations
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN ((OLD.status = 'approved' OR NEW.status = 'approved')
                       AND (OLD.status IS DISTINCT FROM NEW.status
                            OR OLD.trainer_id IS DISTINCT FROM NEW.trainer_id))
    EXECUTE FUNCTION trg_allocations_load_settle();
CREATE CONSTRAINT TRIGGER trainer_allocations_load_settle_deleted
    AFTER DELETE ON trainer_allocations
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (OLD.status = 'approved')
    EXECUTE FUNCTION trg_allocations_load_settle();

-- After writes with triggers off (session_replication_role = replica: the benchmark's seeding,
-- a repair), the counts are set again from the allocations. The owner's (no grant).
CREATE FUNCTION kc_recount_trainer_load() RETURNS bigint
LANGUAGE sql
SET search_path = public, pg_temp
AS $$
    WITH counted AS (
        INSERT INTO trainer_load (trainer_id, live_allocations)
        SELECT t.id, (SELECT count(*) FROM trainer_allocations ta
                      WHERE ta.trainer_id = t.id AND ta.status = 'approved')
        FROM trainers t
        ORDER BY t.id
        ON CONFLICT (trainer_id) DO UPDATE SET live_allocations = EXCLUDED.live_allocations
        WHERE trainer_load.live_allocations IS DISTINCT FROM EXCLUDED.live_allocations
        RETURNING 1)
    SELECT count(*) FROM counted;
$$;
REVOKE EXECUTE ON FUNCTION kc_recount_trainer_load() FROM PUBLIC;

-- Trigger functions are not called directly.
REVOKE EXECUTE ON FUNCTION trg_trainers_load_row(), trg_allocations_load_touch(),
    trg_allocations_load_settle(), kc_load_touch(uuid[]) FROM PUBLIC;
-- The stage's search reads it (kc_operator reads every table by default privilege).
GRANT SELECT ON trainer_load TO kc_worker;

-- Sessions: one composite foreign key to their allocation checks at once that it exists and
-- that the session's student and course are the allocation's (issue 25). A session row then
-- costs two foreign-key checks instead of four (the trainer keeps its own: a substitute may
-- teach a session of someone else's allocation). The allocation's own keys to students and
-- courses still stand behind the student and the course.
ALTER TABLE trainer_allocations
    ADD CONSTRAINT trainer_allocations_id_student_course_key UNIQUE (id, student_id, course_id);
ALTER TABLE tutoring_sessions
    ADD CONSTRAINT tutoring_sessions_allocation_fkey
        FOREIGN KEY (allocation_id, student_id, course_id)
        REFERENCES trainer_allocations (id, student_id, course_id),
    DROP CONSTRAINT tutoring_sessions_allocation_id_fkey,
    DROP CONSTRAINT tutoring_sessions_student_id_fkey,
    DROP CONSTRAINT tutoring_sessions_course_id_fkey;
