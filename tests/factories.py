"""Rows for tests, written with plain SQL through the public tables (as other systems do)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import DictRow

Conn = psycopg.Connection[DictRow]

# Bengaluru, roughly: students and trainers a few kilometres apart.
HOME = (12.9716, 77.5946)


def course(
    conn: Conn,
    *,
    category: str = "Robotics",
    subcategory: str | None = "Arduino",
    title: str = "Robotics with Arduino",
) -> UUID:
    row = conn.execute(
        "INSERT INTO courses (title, category, subcategory) VALUES (%s, %s, %s) RETURNING id",
        (title, category, subcategory),
    ).fetchone()
    assert row is not None
    return UUID(str(row["id"]))


def student(
    conn: Conn,
    *,
    lat: float = HOME[0],
    lng: float = HOME[1],
    gender: str | None = None,
    timezone: str = "Asia/Kolkata",
    name: str = "Asha",
) -> UUID:
    row = conn.execute(
        "INSERT INTO students (full_name, gender, home_lat, home_lng, timezone) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (name, gender, lat, lng, timezone),
    ).fetchone()
    assert row is not None
    return UUID(str(row["id"]))


def trainer(
    conn: Conn,
    *,
    specialties: Iterable[str] = ("Robotics",),
    rating: float | None = 4.7,
    lat: float = HOME[0] + 0.01,
    lng: float = HOME[1] + 0.01,
    radius_km: float = 10,
    gender: str | None = None,
    status: str = "active",
    weekdays: Iterable[int] = range(1, 8),
    slot: tuple[str, str] = ("08:00", "20:00"),
    name: str = "Ravi",
) -> UUID:
    row = conn.execute(
        "INSERT INTO trainers (full_name, gender, rating, specialties, base_lat, base_lng, "
        "service_radius_km, status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (name, gender, rating, list(specialties), lat, lng, radius_km, status),
    ).fetchone()
    assert row is not None
    trainer_id = UUID(str(row["id"]))
    for day in weekdays:
        conn.execute(
            "INSERT INTO trainer_availability VALUES (%s, %s, %s, %s)",
            (trainer_id, day, slot[0], slot[1]),
        )
    return trainer_id


def payment(
    conn: Conn, student_id: UUID, course_id: UUID, metadata: Any, *, status: str = "succeeded"
) -> UUID:
    row = conn.execute(
        "INSERT INTO payments (student_id, course_id, amount_cents, currency, status, metadata, "
        "confirmed_at) VALUES (%s, %s, 499900, 'INR', %s, %s::jsonb, now()) RETURNING id",
        (student_id, course_id, status, json.dumps(metadata)),
    ).fetchone()
    assert row is not None
    return UUID(str(row["id"]))


def queued_jobs(conn: Conn) -> list[DictRow]:
    return conn.execute(
        "SELECT entrypoint, convert_from(payload, 'UTF8') AS ref, status FROM pgqueuer ORDER BY id"
    ).fetchall()
