"""The stages: each turns one row into the next stage's row."""
