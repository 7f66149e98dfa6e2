"""Tests of this kind: the repository itself: conventions, layers, README and docs, the
benchmark's own code."""
