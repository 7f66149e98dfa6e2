"""Tests of this kind: no database, no process: the pure rules (metadata, schedules,
matching) and other pure logic."""
