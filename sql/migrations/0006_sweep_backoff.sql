-- 0006: the periodic sweep of pending allocations backs off and is bounded.
-- Measured: with 20,000 purchases pending for lack of capacity, retrying every pending row
-- every 5 minutes re-enqueued 52,000 allocation jobs in 8 minutes and cut the throughput of
-- new purchases by 4. The triggers already retry a pending row whenever something changes
-- that could change its answer; the sweep is the safety net, so it waits longer after each
-- unsuccessful try (p_min_age x 2^(attempts-1), at most a day) and takes the oldest first,
-- p_limit at a time.

DROP FUNCTION sweep_pending_allocations(interval);

CREATE FUNCTION sweep_pending_allocations(p_min_age interval DEFAULT interval '5 minutes',
                                          p_limit integer DEFAULT 500)
RETURNS integer
LANGUAGE sql
AS $$
    SELECT count(enqueue_stage('allocation', due.purchase_id))::integer
    FROM (
        SELECT purchase_id FROM trainer_allocations
        WHERE status = 'pending'
          AND updated_at < now() - least(p_min_age * power(2, least(attempts - 1, 20)),
                                         interval '1 day')
        ORDER BY updated_at
        LIMIT p_limit
    ) due
$$;
