"""Metadata parsing and purchase planning: pure, no database."""

from __future__ import annotations

import json
from datetime import date, time, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.errors import InvalidPurchaseError
from workers.metadata import PurchasePlan, parse_metadata, parse_time_slot, plan_purchase
from workers.schedule import ScheduleMode, allowed_weekdays

TODAY = date(2026, 11, 21)  # a Saturday
DEFAULT_SLOT = time(16, 0)


def plan(meta: object, holidays: frozenset[date] = frozenset()) -> PurchasePlan:
    return plan_purchase(meta, today=TODAY, holidays=holidays, default_time_slot=DEFAULT_SLOT)


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("4:00 PM", time(16), None),
        ("16:00", time(16), None),
        ("4 PM", time(16), None),
        ("4pm", time(16), None),
        ("12:30 AM", time(0, 30), None),
        ("12 PM", time(12), None),
        ("7:00 AM - 8:00 AM", time(7), time(8)),
        ("16:00-17:30", time(16), time(17, 30)),
        ("9 am \u2013 10:15 am", time(9), time(10, 15)),
    ],
)
def test_time_slot_formats(text: str, start: time, end: time | None) -> None:
    slot = parse_time_slot(text)
    assert (slot.start, slot.end) == (start, end)


@pytest.mark.parametrize(
    "text",
    [
        "25:00",
        "13 PM",
        "4",
        "noon",
        "16:75",
        "8:00 AM - 7:00 AM",
        "",
        "x" * 500,
        "16:00; DROP TABLE payments",
    ],
)
def test_time_slot_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_time_slot(text)


def test_full_metadata_becomes_typed_plan() -> None:
    result = plan(
        {
            "sessionCount": 20,
            "timeSlot": "7:00 AM - 8:30 AM",
            "startDate": "2026-12-01",
            "scheduleMode": "weekdays",
        }
    )
    assert result.session_count == 20
    assert result.time_slot == time(7)
    assert result.session_duration == 90
    assert result.start_date == date(2026, 12, 1)
    assert result.schedule_mode is ScheduleMode.WEEKDAYS
    assert result.defaults_applied == ()


def test_defaults_are_named_not_silent() -> None:
    result = plan({"sessionCount": 10})
    assert result.time_slot == DEFAULT_SLOT
    assert result.schedule_mode is ScheduleMode.DAILY
    assert result.session_duration == 60
    assert result.start_date == TODAY + timedelta(days=1)
    assert set(result.defaults_applied) == {
        "timeSlot",
        "scheduleMode",
        "startDate",
        "sessionDuration",
    }


def test_sunday_only_defaults_to_80_minutes_and_starts_on_sunday() -> None:
    result = plan({"sessionCount": 10, "scheduleMode": "sunday_only", "startDate": "2026-11-23"})
    assert result.session_duration == 80
    assert result.start_date == date(2026, 11, 29)


def test_past_start_date_moves_forward_past_holidays() -> None:
    result = plan(
        {"sessionCount": 10, "startDate": "2020-01-01", "scheduleMode": "daily"},
        holidays=frozenset({TODAY + timedelta(days=1)}),
    )
    assert result.start_date == TODAY + timedelta(days=2)


def test_missing_session_count_has_no_default() -> None:
    with pytest.raises(InvalidPurchaseError) as info:
        plan({"timeSlot": "4 PM"})
    assert info.value.errors == [
        {"field": "sessionCount", "message": "is required (10, 20 or 30); there is no default"}
    ]


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(InvalidPurchaseError) as info:
        plan(
            {
                "sessionCount": 25,
                "timeSlot": "25:00",
                "startDate": "2026-02-30",
                "scheduleMode": "fortnightly",
                "sessionDuration": 5,
                "upgrade": "yes",
            }
        )
    fields = [e["field"] for e in info.value.errors]
    assert fields == [
        "sessionCount",
        "timeSlot",
        "startDate",
        "scheduleMode",
        "sessionDuration",
        "upgrade",
    ]
    assert info.value.reason == "invalid_metadata"


@pytest.mark.parametrize("raw", [None, [], "sessionCount=10", 10, True])
def test_metadata_must_be_an_object(raw: object) -> None:
    with pytest.raises(InvalidPurchaseError, match="must be a JSON object"):
        parse_metadata(raw)


@pytest.mark.parametrize("count", [True, 10.5, "ten", None, [10], {"n": 10}])
def test_session_count_wrong_types(count: object) -> None:
    with pytest.raises(InvalidPurchaseError, match="sessionCount"):
        parse_metadata({"sessionCount": count})


def test_session_count_as_numeric_string_is_accepted() -> None:
    assert parse_metadata({"sessionCount": "20"}).session_count == 20


def test_duration_must_agree_with_slot_range() -> None:
    with pytest.raises(InvalidPurchaseError, match="spans 60 minutes"):
        plan({"sessionCount": 10, "timeSlot": "7 AM - 8 AM", "sessionDuration": 90})


def test_session_may_not_cross_midnight() -> None:
    with pytest.raises(InvalidPurchaseError, match="after midnight"):
        plan({"sessionCount": 10, "timeSlot": "11:30 PM"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
metadata_like = st.dictionaries(
    st.sampled_from(
        [
            "sessionCount",
            "timeSlot",
            "startDate",
            "scheduleMode",
            "sessionDuration",
            "upgrade",
            "other",
        ]
    ),
    json_values,
    max_size=7,
)


@given(st.one_of(json_values, metadata_like))
def test_any_json_is_a_plan_or_a_clear_rejection(raw: object) -> None:
    try:
        result = plan(raw)
    except InvalidPurchaseError as exc:
        assert exc.errors
        assert all(e["field"] and e["message"] for e in exc.errors)
        json.dumps(exc.errors)  # storable as jsonb
    else:
        assert result.session_count in (10, 20, 30)
        assert result.start_date > TODAY


@given(
    count=st.sampled_from([10, 20, 30]),
    mode=st.sampled_from(list(ScheduleMode)),
    hour=st.integers(min_value=1, max_value=12),
    minute=st.sampled_from([0, 15, 30, 45]),
    pm=st.booleans(),
    start=st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 1, 1)),
)
def test_valid_metadata_always_plans(
    count: int, mode: ScheduleMode, hour: int, minute: int, pm: bool, start: date
) -> None:
    slot = f"{hour}:{minute:02d} {'PM' if pm and hour != 12 else 'AM' if not pm else 'PM'}"
    if pm and hour >= 10:  # keep 80-minute sessions before midnight
        slot = f"{hour}:{minute:02d} AM"
    result = plan(
        {
            "sessionCount": count,
            "scheduleMode": mode.value,
            "timeSlot": slot,
            "startDate": start.isoformat(),
        }
    )
    assert result.session_count == count
    assert result.start_date >= max(start, TODAY + timedelta(days=1))
    assert result.start_date.isoweekday() in allowed_weekdays(mode)


@pytest.mark.parametrize(
    "name", ["x" * 20_000, "../etc/passwd", "Mars/Base", "", "Asia/Kolk ata", "/etc/localtime"]
)
def test_bad_time_zones_are_rejections_not_crashes(name: str) -> None:
    from workers.purchase import student_zone

    with pytest.raises(InvalidPurchaseError, match="not an IANA time zone"):
        student_zone(name)
