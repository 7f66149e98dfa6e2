"""Business events for the app: what it hears of each decision, in its own shapes.

The database writes them (migration 0017: triggers on the output tables put each change's
events into the `business_events` outbox, in the change's transaction) and numbers them in
commit order for every reader. Here: `shapes.py`, the app's event types and their fields
(kc-backend shared/events/types.ts), pure; `relay.py`, the process that publishes them on
Redis (`business-events` Pub/Sub and a bounded stream) when REDIS_URL is set. docs/events.md
says what each event means and when it is written.
"""
