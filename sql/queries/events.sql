-- Business events: the relay (workers/events/relay.py) and the operator commands.

-- name: register_relay
-- The relay's cursor: created at the end of the feed on its first run (what happened before
-- a relay existed is not sent to phones now), kept from then on.
SELECT register_event_consumer(%(consumer)s::text) AS position;

-- name: hold_relay_consumer
-- One relay per consumer: a session lock, gone with the connection of the relay holding it.
SELECT pg_try_advisory_lock(hashtextextended('kc-relay:' || %(consumer)s::text, 0)) AS held;

-- name: relay_events
SELECT pos, event_id, type, purchase_id, event::text AS json
FROM consumer_events(%(consumer)s::text, %(limit)s::integer);

-- name: advance_relay
SELECT advance_event_consumer(%(consumer)s::text, %(position)s::bigint) AS position;

-- name: events_after
SELECT pos, event_id, type, purchase_id, occurred_at, event
FROM events_after(%(position)s::bigint, %(limit)s::integer);

-- name: last_event_position
SELECT last_position FROM business_event_sequencer;

-- name: event_lag
SELECT consumer, position, events_behind,
       round(seconds_behind::numeric, 1) AS seconds_behind,
       date_trunc('second', updated_at) AS updated_at
FROM business_event_lag
ORDER BY consumer;

-- name: trace_business_events
-- A purchase's events, in the order they were written (position: their place in the feed,
-- NULL until a reader numbers them).
SELECT p.position, e.occurred_at AS at, e.type, e.payload ->> 'userId' AS user_id,
       e.payload ->> 'role' AS role,
       coalesce(e.payload ->> 'title', e.payload ->> 'reason', '') AS detail, e.event_id
FROM business_events e
LEFT JOIN business_event_positions p ON p.event_id = e.event_id
WHERE e.purchase_id = ANY (%(purchases)s::uuid[])
ORDER BY e.seq;

-- name: prune_events
SELECT prune_business_events(%(keep)s::interval) AS events_deleted;

-- name: running_relays
SELECT count(*) AS n FROM pg_stat_activity
WHERE datname = current_database() AND application_name = %(name)s::text;
