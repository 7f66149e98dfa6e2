"""The worker runtime: the pgqueuer worker, its driver, the supervisor, the stage runner."""
