"""Rules written in both Python and SQL agree: one table of inputs per pair, both halves called.

Each business rule has one home where it can; where both languages need it (Python plans and
validates without a database, SQL enforces and serves the operator's functions), the pair is
listed in CONVENTIONS.md and tested here against a real PostgreSQL. A new pair gets a test
here; `test_each_sql_rule_has_one_home` fails when a function spells a rule out again
instead of calling its home.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from datetime import date, time
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import DictRow, dict_row
from pydantic import ValidationError

from tests.conftest import with_database
from workers.errors import InvalidPurchaseError, ScheduleError
from workers.rules.matching import capacity_for
from workers.rules.metadata import (
    FIELDS,
    MODE_WORDS,
    latest_start,
    mode_of,
    parse_clock,
    plan_purchase,
)
from workers.rules.schedule import (
    LearningMode,
    ScheduleMode,
    allowed_weekdays,
    delivery_for,
    slot_end,
)

Conn = psycopg.Connection[DictRow]


@pytest.fixture(scope="module")
def rules(admin_url: str, template_db: str) -> Iterator[Conn]:
    """One copy of the migrated database for the whole module: the rule functions are
    IMMUTABLE and read no table, so the cases need no copy each."""
    name = f"kc_test_pairs_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        url = with_database(admin_url, name)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            yield conn
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sql_value(conn: Conn, query: str, *args: object) -> object:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row["v"]


# --- capacity by rating: matching.capacity_for / kc_trainer_capacity -------------------------
RATINGS = [None, "0", "1", "3.0", "3.09", "3.1", "3.5", "3.59", "3.6", "4.0", "4.09", "4.1"]
RATINGS += ["4.5", "4.59", "4.6", "4.99", "5", "5.0"]


@pytest.mark.parametrize("rating", RATINGS)
def test_capacity_by_rating(rules: Conn, rating: str | None) -> None:
    value = None if rating is None else Decimal(rating)
    sql = sql_value(rules, "SELECT kc_trainer_capacity(%s::numeric) AS v", value)
    assert sql == capacity_for(value)


# --- ends by midnight: schedule.slot_end / kc_slot_end (kc_reschedule calls it) ---------------
# Slots are whole minutes (parse_clock and kc_parse_clock read no seconds).
SLOTS = [
    ("00:00", 15),
    ("07:30", 60),
    ("16:00", 60),
    ("22:59", 60),
    ("23:00", 59),
    ("23:00", 60),  # midnight exactly: 24:00
    ("23:00", 61),
    ("23:30", 30),
    ("23:30", 31),
    ("22:00", 120),
    ("21:00", 240),
    ("20:00", 240),
    ("23:59", 1),
    ("23:59", 2),
]


def python_slot_end(start: time, minutes: int) -> str:
    try:
        end = slot_end(start, minutes)
    except ScheduleError:
        return "past midnight"
    return "24:00:00" if end is None else end.isoformat()


@pytest.mark.parametrize(("start", "minutes"), SLOTS)
def test_ends_by_midnight(rules: Conn, start: str, minutes: int) -> None:
    sql = sql_value(rules, "SELECT kc_slot_end(%s::time, %s::integer)::text AS v", start, minutes)
    assert (sql or "past midnight") == python_slot_end(time.fromisoformat(start), minutes)


# --- mode words: metadata.MODE_WORDS (mode_of) / kc_mode_of (kc_reschedule calls it) ---------
def spellings(word: str) -> list[str]:
    return [word, word.upper(), f"  {word}\t", word.capitalize()]


MODE_TEXTS = [text for word in MODE_WORDS for text in spellings(word)]
MODE_TEXTS += ["Sunday Only", "sunday-only", "SUNDAY_ONLY", "WEEKDAY_DAILY", "weekday daily"]
MODE_TEXTS += ["Sunday__Only", "sun day", "daily\n", "every-day", "sunday_focus"]
# non-words, and words only Unicode would make one
MODE_TEXTS += ["", " ", "weekly", "fortnightly", "day", "dailyx", "daily!", "daily.", "weekday"]
MODE_TEXTS += ["sundays", "sunday only please", "d a i l y", "daily\x1c", "daily\u00a0"]
MODE_TEXTS += ["WEE\u212aDAYS", "dai\u2010ly", "dai\u0131ly", "DA\u0130LY", "\u3000daily"]
MODE_TEXTS += ["x" * 201, "daily" + " " * 195, "daily" + " " * 196]


@pytest.mark.parametrize("text", MODE_TEXTS, ids=repr)
def test_mode_words(rules: Conn, text: str) -> None:
    sql = sql_value(rules, "SELECT kc_mode_of(%s::text) AS v", text)
    python = mode_of(text)
    assert sql == (None if python is None else python.value)


# --- schedule mode weekdays: schedule.allowed_weekdays / kc_mode_weekdays --------------------
@pytest.mark.parametrize("mode", list(ScheduleMode))
def test_mode_weekdays(rules: Conn, mode: ScheduleMode) -> None:
    days = sql_value(rules, "SELECT kc_mode_weekdays(%s::text) AS v", mode.value)
    assert isinstance(days, list) and set(days) == allowed_weekdays(mode)


# --- clock times: metadata.parse_clock / kc_parse_clock -------------------------------------
def python_clock(text: str) -> str:
    try:
        return parse_clock(text).isoformat()
    except ValueError:
        return "refused"


def sql_clock(conn: Conn, text: str) -> str:
    try:
        return str(sql_value(conn, "SELECT kc_parse_clock(%s::text)::text AS v", text))
    except psycopg.errors.InvalidDatetimeFormat:
        return "refused"


CLOCKS = ["4:00 PM", "4 PM", "4pm", "16:00", "07:30", "7:30", "12 am", "12 AM", "12 pm", "0:00"]
CLOCKS += ["00:00", "23:59", "11:59 p.m.", "11 A. M.", "1 pm.", " 9:05 am ", "\t6 PM\n"]
CLOCKS += ["13 PM", "0 AM", "24:00", "25:00", "16", "16:60", "16:5", "16:075", "4 xm", "4 m"]
CLOCKS += ["4 PM!", "4:00 PMx", "teatime", "", " ", "4::00", "-4:00", "+4 PM", "4 P M"]
CLOCKS += ["\u096a:\u0966\u0966 PM", "\uff14 PM", "4\u00a0PM", "4:00 \u1d18\u1d0d", "123"]


@pytest.mark.parametrize("text", CLOCKS, ids=repr)
def test_clock_times(rules: Conn, text: str) -> None:
    assert sql_clock(rules, text) == python_clock(text)


# Clock times as people type them, ASCII, many more than the table: the same pair, searched.
clock_text = st.builds(
    lambda lead, hour, minute, gap, meridiem, trail: f"{lead}{hour}{minute}{gap}{meridiem}{trail}",
    st.sampled_from(["", " ", "\t"]),
    st.integers(0, 130).map(str) | st.sampled_from(["07", "00", ""]),
    st.sampled_from(["", ":00", ":30", ":5", ":60", ":59", ":075"]),
    st.sampled_from(["", " ", "  "]),
    st.sampled_from(["", "am", "PM", "p.m.", "A. M.", "pm.", "m", "xm", "a"]),
    st.sampled_from(["", " ", "\n", "!"]),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clock_text)
def test_clock_times_searched(rules: Conn, text: str) -> None:
    assert sql_clock(rules, text) == python_clock(text)


# --- latest start (a year ahead): metadata.latest_start / kc_latest_start --------------------
TODAYS = [date(2026, 12, 6), date(2027, 1, 1), date(2027, 12, 31), date(2028, 2, 28)]
TODAYS += [date(2028, 2, 29), date(2028, 3, 1), date(2029, 3, 1), date(9998, 12, 31)]
TODAYS += [date(9999, 1, 1), date(9999, 12, 31), date(1, 1, 1)]


@pytest.mark.parametrize("today", TODAYS, ids=str)
def test_latest_start(rules: Conn, today: date) -> None:
    assert sql_value(rules, "SELECT kc_latest_start(%s::date) AS v", today) == latest_start(today)


# --- where a session happens: schedule.delivery_for / kc_session_delivery -------------------
DELIVERIES = [(mode, number) for mode in LearningMode for number in range(0, 33)]


@pytest.mark.parametrize(("mode", "number"), DELIVERIES)
def test_delivery(rules: Conn, mode: LearningMode, number: int) -> None:
    sql = sql_value(rules, "SELECT kc_session_delivery(%s::text, %s::integer) AS v", mode, number)
    assert sql == delivery_for(mode, number).value


# --- a purchase's values: metadata's validators / the CHECKs on student_course_purchases ------
# The metadata refuses a bad value with a sentence; the CHECK is the last line of defence for
# a row written any other way. Both must accept the same values (canonical spellings: the
# metadata lower-cases a mode before it is stored).
PURCHASE_VALUES: list[tuple[str, str, object]] = [
    ("sessionCount", "purchase_tier", v) for v in (0, 1, 9, 10, 11, 20, 29, 30, 31)
]
PURCHASE_VALUES += [("sessionDuration", "session_duration_minutes", v) for v in (14, 15, 240, 241)]
PURCHASE_VALUES += [("sessionDuration", "session_duration_minutes", v) for v in (0, 60, 80)]
PURCHASE_VALUES += [("groupSize", "group_size", v) for v in (0, 1, 2, 3, 4)]
PURCHASE_VALUES += [("learningMode", "learning_mode", v) for v in ("home", "hybrid", "online")]
PURCHASE_VALUES += [("scheduleMode", "schedule_mode", v) for v in (*ScheduleMode, "weekly")]


def check_accepts(conn: Conn, changes: Mapping[str, object]) -> bool:
    """Whether the CHECKs of student_course_purchases accept a valid row with `changes`."""
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS purchase_checks "
        "(LIKE student_course_purchases INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
    sets = ", ".join(f"{column} = %s" for column in changes)
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(
                "INSERT INTO purchase_checks (payment_id, student_id, course_id, purchase_tier, "
                "start_date, preferred_time_slot, schedule_mode, session_duration_minutes) "
                "VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 30, "
                "'2027-01-04', '16:00', 'daily', 60)"
            )
            conn.execute(f"UPDATE purchase_checks SET {sets}", list(changes.values()))
    except psycopg.errors.CheckViolation:
        return False
    return True


@pytest.mark.parametrize(("field", "column", "value"), PURCHASE_VALUES, ids=str)
def test_purchase_values(rules: Conn, field: str, column: str, value: object) -> None:
    (spec,) = [spec for spec in FIELDS if spec.name == field]
    try:
        spec.adapter.validate_python(value)
        python = True
    except ValidationError:
        python = False
    assert check_accepts(rules, {column: value}) == python


# --- hybrid is exactly 30 sessions: the metadata's cross-field rule / student_course_purchases
# _hybrid_is_30 ----------------------------------------------------------------------------------
HYBRID = [(mode, count) for mode in LearningMode for count in (10, 20, 30)]


@pytest.mark.parametrize(("mode", "count"), HYBRID)
def test_hybrid_is_30(rules: Conn, mode: LearningMode, count: int) -> None:
    metadata = {"sessionCount": count, "learningMode": mode.value}
    try:
        plan_purchase(metadata, today=date(2027, 1, 4), holidays=(), default_time_slot=time(16))
        python = True
    except InvalidPurchaseError:
        python = False
    changes = {"learning_mode": mode.value, "purchase_tier": count}
    assert check_accepts(rules, changes) == python


# --- one SQL home: no function spells a rule out again -------------------------------------
# (a fragment only the rule's home may hold, the home)
HOMES = [
    ("86400", "kc_slot_end"),  # seconds in a day: "ends by midnight"
    ("interval '1 year'", "kc_latest_start"),
    ("'everyday'", "kc_mode_of"),
    ("'sundayonly'", "kc_mode_of"),
    ("4.6", "kc_trainer_capacity"),
]


@pytest.mark.parametrize(("fragment", "home"), HOMES)
def test_each_sql_rule_has_one_home(rules: Conn, fragment: str, home: str) -> None:
    rows = rules.execute(
        "SELECT p.proname AS name FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'public' AND strpos(p.prosrc, %s) > 0 ORDER BY 1",
        (fragment,),
    ).fetchall()
    names = [row["name"] for row in rows]
    assert names == [home], f"{fragment!r}: call {home} instead of spelling it out"
