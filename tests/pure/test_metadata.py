"""Metadata parsing and purchase planning: pure, no database."""

from __future__ import annotations

import json
from datetime import date, time, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.errors import InvalidPurchaseError
from workers.rules.metadata import (
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    PurchasePlan,
    decode_metadata,
    json_depth,
    latest_start,
    parse_metadata,
    parse_time_slot,
    plan_purchase,
)
from workers.rules.schedule import LearningMode, ScheduleMode, allowed_weekdays

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
            "learningMode": "home",
            "groupSize": 2,
        }
    )
    assert result.session_count == 20
    assert (result.learning_mode, result.group_size) == (LearningMode.HOME, 2)
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
        "learningMode",
        "groupSize",
    }
    assert (result.learning_mode, result.group_size) == (LearningMode.HOME, 1)
    assert result.preferred_trainer_id is None


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
    start=st.dates(min_value=date(2020, 1, 1), max_value=latest_start(TODAY)),
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
    "name",
    [
        "x" * 20_000,
        "../etc/passwd",
        "Mars/Base",
        "",
        "Asia/Kolk ata",
        "/etc/localtime",
        "localtime",  # the worker host's zone: not a student's
        "posixrules",
        "posix/Asia/Kolkata",
        "right/UTC",
        "asia/kolkata",
        "IST",
    ],
)
def test_bad_time_zones_are_rejections_not_crashes(name: str) -> None:
    from workers.stages.purchase import zone_or_rejection

    with pytest.raises(InvalidPurchaseError, match="not an IANA time zone"):
        zone_or_rejection(name)


# --- Issue 10: bad input that used to loop, crash or pass ---------------------------------


def decoded(text: str) -> object:
    return decode_metadata(text, len(text.encode()))


def messages(exc: InvalidPurchaseError) -> str:
    return "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors)


@pytest.mark.parametrize(
    ("mode", "start"),
    [("sunday_only", "9999-12-31"), ("daily", "9999-12-31"), ("weekdays", "5000-01-01")],
)
def test_far_start_date_is_rejected_with_the_bound(mode: str, start: str) -> None:
    with pytest.raises(InvalidPurchaseError) as info:
        plan({"sessionCount": 10, "scheduleMode": mode, "startDate": start})
    assert info.value.errors == [
        {
            "field": "startDate",
            "message": f"{start} is more than a year ahead; the latest start accepted today "
            "is 2027-11-21",
        }
    ]


def test_start_date_exactly_a_year_ahead_is_accepted() -> None:
    assert plan({"sessionCount": 10, "startDate": "2027-11-21"}).start_date == date(2027, 11, 21)
    assert latest_start(date(2028, 2, 29)) == date(2029, 2, 28)
    assert latest_start(date.max) == date.max


@given(
    start=st.dates(),
    mode=st.sampled_from(list(ScheduleMode)),
    today=st.dates(min_value=date(2000, 1, 1), max_value=date(9999, 12, 30)),
)
def test_no_date_overflows(start: date, mode: ScheduleMode, today: date) -> None:
    """Any start date on any day: a plan or a rejection, never OverflowError."""
    meta = {"sessionCount": 30, "scheduleMode": mode.value, "startDate": start.isoformat()}
    try:
        result = plan_purchase(meta, today=today, holidays=(), default_time_slot=DEFAULT_SLOT)
    except InvalidPurchaseError as exc:
        assert exc.errors[0]["field"] == "startDate"
    else:
        # At most a week past the latest start (the next valid day of the mode), said without
        # adding to a date near date.max (the test itself overflowed there).
        assert today < result.start_date
        assert result.start_date - timedelta(days=7) <= latest_start(today)


def test_oversized_metadata_is_refused_before_decoding() -> None:
    huge = 100 * 1024 * 1024
    # Only the size is looked at: the text is not even there (the query withholds it).
    with pytest.raises(InvalidPurchaseError) as info:
        decode_metadata(None, huge)
    assert info.value.errors == [
        {
            "field": "metadata",
            "message": f"is {huge:,} bytes of JSON; the limit is {MAX_METADATA_BYTES:,} bytes",
        }
    ]
    text = '{"sessionCount": 10, "note": "' + "x" * MAX_METADATA_BYTES + '"}'
    with pytest.raises(InvalidPurchaseError, match="the limit is 65,536 bytes"):
        decoded(text)


def test_deep_nesting_is_refused_before_decoding() -> None:
    deep = '{"sessionCount": 10, "x": ' + "[" * 1000 + "]" * 1000 + "}"
    with pytest.raises(InvalidPurchaseError) as info:
        decoded(deep)
    assert messages(info.value) == (
        f"metadata: nests 1001 levels deep; the limit is {MAX_METADATA_DEPTH} levels"
    )
    # Brackets inside strings are text, not nesting.
    assert json_depth('{"a": "[[[[[[[[[[{{{{{{", "b": {"c": "\\"]]"}}') == 2
    assert decoded('{"schedule": {"timeSlot": "4 PM"}, "pricing": {"a": [1]}}') == {
        "schedule": {"timeSlot": "4 PM"},
        "pricing": {"a": [1]},
    }


@pytest.mark.parametrize("text", ["{", '{"sessionCount": NaN}', '{"a": Infinity}', "[1,]"])
def test_text_that_is_not_json_is_a_rejection(text: str) -> None:
    with pytest.raises(InvalidPurchaseError, match="metadata: is not valid JSON"):
        decoded(text)


def test_numbers_are_decoded_exactly() -> None:
    with pytest.raises(InvalidPurchaseError) as info:
        plan(decoded('{"sessionCount": 10.000000000000000001}'))
    assert info.value.errors == [
        {
            "field": "sessionCount",
            "message": "must be 10, 20 or 30, a whole number, got 10.000000000000000001",
        }
    ]
    assert plan(decoded('{"sessionCount": 10.0}')).session_count == 10
    assert plan(decoded('{"sessionCount": 1E1}')).session_count == 10
    with pytest.raises(InvalidPurchaseError, match="sessionDuration: must be a whole number"):
        plan(decoded('{"sessionCount": 10, "sessionDuration": 60.5}'))
    # A 5,000-digit integer is a number like any other, not a crash.
    with pytest.raises(InvalidPurchaseError, match="sessionCount: must be 10, 20 or 30"):
        plan(decoded('{"sessionCount": ' + "9" * 5000 + "}"))
    with pytest.raises(InvalidPurchaseError, match="sessionCount: must be 10, 20 or 30"):
        plan(decoded('{"sessionCount": 1E+999999999}'))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sessionCount", "\u0661\u0660"),  # Arabic-Indic 10
        ("sessionCount", "\uff11\uff10"),  # full-width 10
        ("sessionCount", "\u0967\u0966"),  # Devanagari 10
        ("timeSlot", "\u0664:\u0660\u0660 PM"),
        ("timeSlot", "\uff14 PM"),
        ("startDate", "\u0662\u0660\u0662\u0667-\u0660\u0661-\u0660\u0661"),
        ("sessionDuration", "\u0666\u0660"),
    ],
)
def test_digits_are_ascii_in_every_field(field: str, value: str) -> None:
    with pytest.raises(InvalidPurchaseError) as info:
        plan({"sessionCount": 10, field: value})
    assert [e["field"] for e in info.value.errors] == [field]


def test_ascii_digit_strings_still_work() -> None:
    result = plan({"sessionCount": " 20 ", "sessionDuration": "45", "timeSlot": "4 PM"})
    assert (result.session_count, result.session_duration) == (20, 45)


@pytest.mark.parametrize("text", ["11:00 PM - 12:00 AM", "23:00-00:00", "10 PM to 12 AM"])
def test_slot_may_end_at_midnight(text: str) -> None:
    result = plan({"sessionCount": 10, "timeSlot": text})
    assert result.time_slot.hour in (22, 23)
    assert result.session_duration == (60 if result.time_slot.hour == 23 else 120)


def test_session_may_end_at_midnight_but_not_after() -> None:
    assert plan({"sessionCount": 10, "timeSlot": "11 PM"}).session_duration == 60
    with pytest.raises(InvalidPurchaseError, match="would end after midnight"):
        plan({"sessionCount": 10, "timeSlot": "11:01 PM"})
    with pytest.raises(InvalidPurchaseError, match="would end after midnight"):
        plan({"sessionCount": 10, "timeSlot": "11 PM", "sessionDuration": 61})
    with pytest.raises(ValueError, match="the end must be after the start"):
        parse_time_slot("12:00 AM - 12:00 AM")


@given(
    st.one_of(
        st.text(max_size=200),
        json_values.map(json.dumps),
        st.integers(min_value=0, max_value=400).map(lambda n: "[" * n + "]" * n),
    )
)
def test_any_text_decodes_or_is_a_metadata_rejection(text: str) -> None:
    try:
        value = decoded(text)
    except InvalidPurchaseError as exc:
        assert [e["field"] for e in exc.errors] == ["metadata"]
    else:
        assert json_depth(text) <= MAX_METADATA_DEPTH
        assert not any(isinstance(v, float) for v in _leaves(value))  # never binary floats


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]
