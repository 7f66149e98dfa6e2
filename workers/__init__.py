"""Koding Caravan enrolment pipeline: payment -> purchase -> trainer allocation -> sessions.

Stage code lives in one module per stage (`purchase`, `allocation`, `sessions`); the pure
rules they apply live in `metadata`, `schedule` and `matching`, which do no I/O.
"""
