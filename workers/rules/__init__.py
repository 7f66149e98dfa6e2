"""The pure business rules: metadata, schedules, matching. No I/O."""
