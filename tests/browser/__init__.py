"""Tests of this kind: the console in a real browser (chromium)."""
