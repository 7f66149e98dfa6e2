"""What the console's tests look at: one purchase on track, one waiting for a trainer, one
payment whose purchase stage failed, one rejected payment; operators with their tokens; and
a test client signed in."""

from __future__ import annotations

import html
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from uuid import UUID

import psycopg
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from tests import factories as f
from tests.helpers import drain, one
from workers.console.access import Throttle
from workers.console.app import create_app

Conn = psycopg.Connection[DictRow]
OPERATORS = ("Priya", "Arun", "Mallory")
EVERY_DAY_A_HOLIDAY = (
    "INSERT INTO holidays SELECT d::date, 'closed' FROM generate_series("
    "current_date, current_date + 4 * 366, interval '1 day') d"
)


@dataclass(frozen=True)
class World:
    course: UUID
    trainer: UUID
    on_track: UUID  # the payment of Asha Rao: approved, 10 sessions at 17:00
    waiting: UUID  # the payment of Meera Iyer: 21:00, nobody is free then (no_free_slot)
    waiting_purchase: UUID
    failed: UUID  # the payment of Dev Patel: every day was a holiday (ScheduleError)
    rejected: UUID  # the payment of Kiran Das: sessionCount 7
    tokens: dict[str, str] = field(default_factory=dict)  # operator -> token

    def token(self, name: str = "Priya") -> str:
        return self.tokens[name]


def add_operator(conn: Conn, name: str) -> str:
    """An operator as `python -m workers operator add` makes one; their token."""
    token = secrets.token_urlsafe(32)
    conn.execute("SELECT * FROM console_operator_add(%s, %s)", (name, token))
    return token


def build_world(conn: Conn, db_url: str, operators: tuple[str, ...] = OPERATORS) -> World:
    course = f.course(conn)
    trainer = f.trainer(conn, name="Ravi Kumar")  # 08:00-20:00 every day
    weekdays = {"sessionCount": 10, "scheduleMode": "weekdays"}
    on_track = f.payment(
        conn, f.student(conn, name="Asha Rao"), course, {**weekdays, "timeSlot": "5:00 PM"}
    )
    waiting = f.payment(
        conn, f.student(conn, name="Meera Iyer"), course, {**weekdays, "timeSlot": "9:00 PM"}
    )
    rejected = f.payment(conn, f.student(conn, name="Kiran Das"), course, {"sessionCount": 7})
    drain(db_url)
    conn.execute(EVERY_DAY_A_HOLIDAY)
    failed = f.payment(
        conn, f.student(conn, name="Dev Patel"), course, {**weekdays, "timeSlot": "10:00 AM"}
    )
    drain(db_url)
    conn.execute("DELETE FROM holidays")
    purchase = one(conn, "SELECT id FROM student_course_purchases WHERE payment_id = %s", waiting)
    tokens = {name: add_operator(conn, name) for name in operators}
    return World(course, trainer, on_track, waiting, purchase["id"], failed, rejected, tokens)


def page_text(response_text: str) -> str:
    """What a person reads: the page without its tags, its spaces folded."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", response_text, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text))).strip()


def csrf_of(response_text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', response_text)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


@contextmanager
def console(
    db_url: str,
    *,
    beyond_loopback: bool = False,
    outcome_wait: float = 0.5,
    pool_timeout: float = 5,
    throttle: Throttle | None = None,
    base_url: str = "http://127.0.0.1",
) -> Iterator[TestClient]:
    """The console on the test database, as `make console` serves it on loopback (or, with
    `beyond_loopback`, on 0.0.0.0: every page needs sign-in, any Host is accepted)."""
    app = create_app(
        db_url,
        read_needs_sign_in=beyond_loopback,
        allowed_hosts=["*"] if beyond_loopback else ["127.0.0.1", "localhost", "[::1]"],
        outcome_wait=outcome_wait,
        pool_timeout=pool_timeout,
        throttle=throttle,
    )
    with TestClient(app, base_url=base_url, client=("127.0.0.1", 50000)) as client:
        yield client


def sign_in(client: TestClient, token: str) -> None:
    form = client.get("/signin")
    answer = client.post(
        "/signin",
        data={"csrf": csrf_of(form.text), "token": token, "back": "/"},
        follow_redirects=False,
    )
    assert answer.status_code == 303, page_text(answer.text)


def post(client: TestClient, path: str, data: dict[str, str], page: str = "/") -> tuple[int, str]:
    """Submit a form as the page at `page` offers it (with its CSRF token); the status and
    the text of the page a person then sees."""
    token = csrf_of(client.get(page).text)
    answer = client.post(path, data={"csrf": token, **data}, follow_redirects=False)
    if answer.status_code == 303:
        shown = client.get(answer.headers["location"])
        return 303, page_text(shown.text)
    return answer.status_code, page_text(answer.text)
