"""A session row's allocation, student and course are checked by one composite foreign key
(migration 0020): the allocation must exist and be the same student's, for the same course."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.rows import DictRow

from tests import factories as f
from tests.helpers import drain

Conn = psycopg.Connection[DictRow]
GOOD = {"sessionCount": 10, "timeSlot": "4:00 PM", "scheduleMode": "daily"}

COPY = """INSERT INTO tutoring_sessions (allocation_id, session_number, student_id, trainer_id,
    course_id, scheduled_date, scheduled_time, starts_at, ends_at, duration_minutes)
SELECT allocation_id, 99, {student}, trainer_id, {course}, scheduled_date + 400,
       scheduled_time, starts_at + interval '400 days', ends_at + interval '400 days',
       duration_minutes
FROM tutoring_sessions WHERE session_number = 1"""


@pytest.mark.parametrize(
    ("student", "course"),
    [("%(other_student)s", "course_id"), ("student_id", "%(other_course)s")],
    ids=["another student", "another course"],
)
def test_a_session_of_another_student_or_course_is_refused(
    conn: Conn, db_url: str, student: str, course: str
) -> None:
    course_id = f.course(conn)
    f.trainer(conn)
    f.payment(conn, f.student(conn), course_id, GOOD)
    drain(db_url)
    other_student = f.student(conn, name="Other")
    other_course = f.course(conn, title="Another course")
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="tutoring_sessions_allocation"):
        conn.execute(
            COPY.format(student=student, course=course),
            {"other_student": other_student, "other_course": other_course},
        )
    # The same row with the allocation's own student and course is accepted.
    conn.execute(COPY.format(student="student_id", course="course_id"))
