-- 0022 the leave's safety net (issue 24, part B; after migration 0019, which main already has).
--
-- The course matching does not read leave, so a new course or a make-up may be written for a
-- trainer into the days of their approved leave after the approval gave those days' sessions
-- their substitutes. cover_leaves() covers such sessions as approve_leave would have: the best
-- substitute who fits that one session, or cancelled with its reason (the make-up follows by
-- 0009's rule), with the same locks in the same order (0019's kc_lock_substitutions, the
-- purchases in id order, one trainer's lock at a time). Sessions of a course a long leave
-- hands over are the allocation stage's (unfit_allocations, on_leave). The worker runs it
-- every ten minutes after sweep_lifecycle (workers/stages/lifecycle.py, sweep), in a
-- transaction of its own, at most 200 sessions a run.

-- One session (locked by the caller) of a trainer on leave: the best substitute, or
-- cancelled with the reason (its make-up follows); a history line either way.
CREATE FUNCTION kc_cover_session(p_session_id uuid, p_leave bigint, p_trainer uuid)
RETURNS kc_leave_change
LANGUAGE plpgsql
AS $$
DECLARE
    v_row kc_leave_change;
    v_sub record;
BEGIN
    SELECT ts.id, ts.student_id, ts.scheduled_date, ts.scheduled_time, NULL, ts.trainer_id, NULL
    INTO v_row FROM tutoring_sessions ts WHERE ts.id = p_session_id;
    v_sub := kc_substitute_one(p_session_id, NULL, p_leave);
    IF v_sub.substitute IS NOT NULL THEN
        v_row.outcome := 'substituted';
        v_row.trainer_id := v_sub.substitute;
        v_row.detail := format('%s in place of %s', kc_trainer_label(v_sub.substitute),
                               kc_trainer_label(p_trainer));
        PERFORM kc_session_history(p_session_id, 'substituted',
                                   format('%s, leave %s', v_row.detail, p_leave));
    ELSE
        v_row.outcome := 'cancelled';
        v_row.detail := format('nobody can take it during %s''s leave %s: %s',
                               kc_trainer_label(p_trainer), p_leave, v_sub.why);
        -- Recorded before the cancellation, whose make-up line follows it.
        PERFORM kc_session_history(p_session_id, 'leave', 'cancelled, ' || v_row.detail);
        UPDATE tutoring_sessions
        SET status = 'cancelled', cancel_reason = v_row.detail, substitution_leave_id = p_leave
        WHERE id = p_session_id;
    END IF;
    RETURN v_row;
END
$$;

-- Returns how many sessions it covered.
CREATE FUNCTION kc_cover_leaves(p_limit integer)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_due   uuid[];
    v_s     record;
    v_done  integer := 0;
BEGIN
    SELECT array_agg(d.id ORDER BY d.starts_at, d.id) INTO v_due
    FROM (SELECT ts.id, ts.starts_at
          FROM tutoring_sessions ts
          JOIN trainer_leaves l
            ON l.trainer_id = ts.trainer_id AND l.status = 'approved'
           AND ts.scheduled_date BETWEEN l.first_day AND l.last_day
          JOIN trainer_allocations ta ON ta.id = ts.allocation_id
          WHERE ts.status = 'scheduled' AND ts.starts_at > now()
            AND l.last_day >= kc_leave_today()
            AND NOT (l.handed_over AND ta.trainer_id = ts.trainer_id)
          ORDER BY ts.starts_at, ts.id
          LIMIT p_limit) d;
    IF v_due IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM kc_lock_substitutions();
    PERFORM kc_lock_sessions(v_due);
    FOR v_s IN
        SELECT ts.id, l.id AS leave_id, l.trainer_id
        FROM unnest(v_due) WITH ORDINALITY AS u(id, n)
        JOIN tutoring_sessions ts ON ts.id = u.id
        JOIN trainer_leaves l
          ON l.trainer_id = ts.trainer_id AND l.status = 'approved'
         AND ts.scheduled_date BETWEEN l.first_day AND l.last_day
        WHERE ts.status = 'scheduled' AND ts.starts_at > now()
        ORDER BY u.n
    LOOP
        PERFORM kc_cover_session(v_s.id, v_s.leave_id, v_s.trainer_id);
        v_done := v_done + 1;
    END LOOP;
    RETURN v_done;
END
$$;

CREATE FUNCTION cover_leaves(p_limit integer DEFAULT 200)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$ SELECT kc_cover_leaves(p_limit) $$;

REVOKE EXECUTE ON FUNCTION kc_cover_session(uuid, bigint, uuid), kc_cover_leaves(integer),
    cover_leaves(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cover_leaves(integer) TO kc_worker;

COMMENT ON FUNCTION kc_cover_session(uuid, bigint, uuid) IS
    'One session (locked by the caller) of a trainer on leave: the best substitute who fits it, or cancelled with cancel_reason (its make-up follows); a history line (substituted, or leave) either way. Returns what it did.';
COMMENT ON FUNCTION kc_cover_leaves(integer) IS
    'Covers up to p_limit scheduled sessions ahead whose trainer is on approved leave that day (not those of a course a long leave hands over): the substitutions lock, the purchases in id order, then kc_cover_session each. Returns how many.';
COMMENT ON FUNCTION cover_leaves(integer) IS
    'The worker''s ten-minute sweep for sessions written into an approved leave after its approval (a new course, a make-up): kc_cover_leaves as the owner.';
