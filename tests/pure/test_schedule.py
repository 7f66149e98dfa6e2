"""Schedule generation: pure, no database."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.errors import InvalidTimezoneError, PermanentJobError, ScheduleError
from workers.rules.schedule import (
    Delivery,
    ScheduleMode,
    allowed_weekdays,
    build_schedule,
    iana_zone_names,
    local_tomorrow,
    plan_sessions,
    resume_from,
    session_dates,
    slot_end,
    student_zone,
    zone_named,
)

KOLKATA = ZoneInfo("Asia/Kolkata")


def test_daily_ten_sessions_at_four_pm_kolkata() -> None:
    sessions = build_schedule(
        start=date(2026, 11, 23),
        count=10,
        mode=ScheduleMode.DAILY,
        slot=time(16),
        duration_minutes=60,
        zone=KOLKATA,
        holidays=set(),
    )
    assert [s.number for s in sessions] == list(range(1, 11))
    assert sessions[0].starts_at == datetime(2026, 11, 23, 10, 30, tzinfo=UTC)
    assert all(s.local_time == time(16) for s in sessions)
    assert sessions[-1].local_date == date(2026, 12, 2)
    assert sessions[0].ends_at - sessions[0].starts_at == timedelta(minutes=60)


def test_sunday_only_is_one_session_each_sunday() -> None:
    days = session_dates(date(2026, 11, 23), 10, ScheduleMode.SUNDAY_ONLY, set())
    assert all(d.isoweekday() == 7 for d in days)
    assert all((b - a).days == 7 for a, b in pairwise(days))


def test_weekdays_skip_weekends_and_holidays() -> None:
    holiday = date(2026, 11, 25)
    days = session_dates(date(2026, 11, 23), 5, ScheduleMode.WEEKDAYS, {holiday})
    assert days == [
        date(2026, 11, 23),
        date(2026, 11, 24),
        date(2026, 11, 26),
        date(2026, 11, 27),
        date(2026, 11, 30),
    ]


def test_dst_keeps_wall_clock_time_and_moves_the_instant() -> None:
    zone = ZoneInfo("Europe/Berlin")  # clocks go back on 2026-10-25
    sessions = build_schedule(
        start=date(2026, 10, 24),
        count=2,
        mode=ScheduleMode.DAILY,
        slot=time(16),
        duration_minutes=60,
        zone=zone,
        holidays=set(),
    )
    assert [s.local_time for s in sessions] == [time(16), time(16)]
    assert sessions[0].starts_at.hour == 14 and sessions[1].starts_at.hour == 15


def test_time_in_dst_gap_moves_forward() -> None:
    zone = ZoneInfo("America/New_York")  # 02:30 does not exist on 2026-03-08
    [session] = build_schedule(
        start=date(2026, 3, 8),
        count=1,
        mode=ScheduleMode.DAILY,
        slot=time(2, 30),
        duration_minutes=60,
        zone=zone,
        holidays=set(),
    )
    assert session.local_time == time(3, 30)
    assert session.starts_at == datetime(2026, 3, 8, 7, 30, tzinfo=UTC)


def test_impossible_schedule_is_an_error_not_a_hang() -> None:
    every_day = {date(2026, 1, 1) + timedelta(days=i) for i in range(4 * 366)}
    with pytest.raises(ScheduleError, match="holiday"):
        session_dates(date(2026, 1, 1), 10, ScheduleMode.DAILY, every_day)


@given(
    start=st.dates(min_value=date(2024, 1, 1), max_value=date(2032, 1, 1)),
    count=st.sampled_from([10, 20, 30]),
    mode=st.sampled_from(list(ScheduleMode)),
    holidays=st.sets(st.dates(min_value=date(2024, 1, 1), max_value=date(2033, 1, 1)), max_size=60),
    zone=st.sampled_from(["Asia/Kolkata", "Europe/London", "America/New_York", "UTC"]),
    slot=st.times(min_value=time(6), max_value=time(21)),
    duration=st.integers(min_value=15, max_value=120),
)
def test_schedule_properties(
    start: date,
    count: int,
    mode: ScheduleMode,
    holidays: set[date],
    zone: str,
    slot: time,
    duration: int,
) -> None:
    slot = slot.replace(second=0, microsecond=0)
    sessions = build_schedule(
        start=start,
        count=count,
        mode=mode,
        slot=slot,
        duration_minutes=duration,
        zone=ZoneInfo(zone),
        holidays=holidays,
    )
    assert len(sessions) == count
    assert [s.number for s in sessions] == list(range(1, count + 1))
    assert all(a.starts_at < b.starts_at for a, b in pairwise(sessions))
    assert all(a.ends_at <= b.starts_at for a, b in pairwise(sessions))
    assert all(s.local_date >= start for s in sessions)
    assert not any(s.local_date in holidays for s in sessions)
    assert all(s.local_date.isoweekday() in allowed_weekdays(mode) for s in sessions)
    assert all(s.ends_at - s.starts_at == timedelta(minutes=duration) for s in sessions)
    assert all(s.starts_at.astimezone(ZoneInfo(zone)).date() == s.local_date for s in sessions)


def test_the_end_of_the_calendar_is_an_error_not_an_overflow() -> None:
    with pytest.raises(ScheduleError, match="only 1 of 10 sunday_only sessions"):
        session_dates(date(9999, 12, 25), 10, ScheduleMode.SUNDAY_ONLY, set())
    # The last day exists, but its instant in a zone behind UTC is in the year 10000.
    with pytest.raises(ScheduleError, match="beyond the calendar"):
        build_schedule(
            start=date(9999, 12, 31),
            count=1,
            mode=ScheduleMode.DAILY,
            slot=time(22),
            duration_minutes=60,
            zone=ZoneInfo("America/New_York"),
            holidays=set(),
        )


@pytest.mark.parametrize(
    "name", ["localtime", "posixrules", "posix/Asia/Kolkata", "Mars/Base", "", "../../etc/passwd"]
)
def test_only_iana_zone_names_are_zones(name: str) -> None:
    with pytest.raises(InvalidTimezoneError, match="is not an IANA time zone") as info:
        zone_named(name)
    assert isinstance(info.value, PermanentJobError)  # a stage fails at once, no retry


def test_every_iana_name_is_a_zone() -> None:
    names = iana_zone_names()
    assert {"Asia/Kolkata", "UTC", "America/New_York", "Europe/Berlin"} <= names
    assert "localtime" not in names
    for name in sorted(names):
        assert zone_named(name).key == name


def test_slot_end_allows_midnight_exactly() -> None:
    assert slot_end(time(16), 60) == time(17)
    assert slot_end(time(23), 60) is None  # midnight: 24:00
    with pytest.raises(ScheduleError, match="after midnight"):
        slot_end(time(23), 61)


# --- A purchase's schedule, as the allocation and sessions stages plan it ------------------


@given(
    st.dates(max_value=date(9000, 1, 1)), st.lists(st.none() | st.dates(max_value=date(9000, 1, 1)))
)
def test_resume_from_is_the_first_free_day(earliest: date, taken: list[date | None]) -> None:
    day = resume_from(earliest, *taken)
    assert day >= earliest
    assert all(day > t for t in taken if t is not None)
    # The first such day, not a later one.
    assert day == earliest or any(t is not None and day == t + timedelta(days=1) for t in taken)


def test_local_tomorrow_is_the_students_tomorrow() -> None:
    # 20:00 UTC on 1 December is already 2 December in Kolkata (UTC+5:30), not in New York.
    now = datetime(2026, 12, 1, 20, 0, tzinfo=UTC)
    assert local_tomorrow("Asia/Kolkata", now) == date(2026, 12, 3)
    assert local_tomorrow("America/New_York", now) == date(2026, 12, 2)


def test_a_students_zone_that_is_no_zone_fails_the_job_naming_the_row() -> None:
    with pytest.raises(InvalidTimezoneError, match=r"students\.timezone 'Mars/Base'") as info:
        student_zone("Mars/Base")
    assert "replay the job" in str(info.value)
    with pytest.raises(InvalidTimezoneError, match=r"students\.timezone"):
        local_tomorrow("localtime", datetime(2026, 12, 1, tzinfo=UTC))


def test_plan_sessions_reads_a_purchase_row() -> None:
    purchase = {
        "schedule_mode": "sunday_only",
        "preferred_time_slot": time(10),
        "session_duration_minutes": 80,
        "learning_mode": "hybrid",
        "timezone": "Asia/Kolkata",
    }
    holidays = {date(2026, 12, 6)}  # a Sunday
    sessions = plan_sessions(
        purchase, earliest=date(2026, 12, 2), count=3, first_number=6, holidays=holidays
    )
    assert [s.local_date for s in sessions] == [
        date(2026, 12, 13),
        date(2026, 12, 20),
        date(2026, 12, 27),
    ]
    assert [s.number for s in sessions] == [6, 7, 8]
    # Where a session happens follows its number (hybrid: 1-6 online, then alternating).
    assert [s.delivery for s in sessions] == [Delivery.ONLINE, Delivery.ONLINE, Delivery.HOME]
    assert {s.local_time for s in sessions} == {time(10)}
    assert {s.ends_at - s.starts_at for s in sessions} == {timedelta(minutes=80)}
