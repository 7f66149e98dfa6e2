"""`make bench`: the pipeline's numbers next to pgqueuer's own, measured in one run."""
