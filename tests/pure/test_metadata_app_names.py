"""Issue 11, pure: the real app's names, nested schedule, mode words, hybrid classes, group
size, chosen trainer, unread keys, conflicts between names, and one pass over every problem."""

from __future__ import annotations

import uuid
from datetime import date, time
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.pure.test_metadata import plan
from workers.errors import InvalidPurchaseError
from workers.rules.metadata import (
    APP_MODE_LABELS,
    APP_MODE_WORDS,
    FIELDS,
    learnings_metadata,
    parse_metadata,
)
from workers.rules.schedule import (
    Delivery,
    LearningMode,
    ScheduleMode,
    build_schedule,
    delivery_for,
    zone_named,
)

TRAINER = "7f0c4a52-8a51-4a38-9d0e-2b1f6a1c9e11"


def problems(meta: object) -> list[dict[str, str]]:
    with pytest.raises(InvalidPurchaseError) as info:
        plan(meta)
    return info.value.errors


def test_nested_schedule_is_read() -> None:
    """The issue's first example: parsed before as the 16:00 default from tomorrow."""
    result = plan(
        {"sessionCount": 10, "schedule": {"startDate": "2026-12-01", "timeSlot": "6:00 PM"}}
    )
    assert (result.time_slot, result.start_date) == (time(18), date(2026, 12, 1))
    assert "timeSlot" not in result.defaults_applied
    assert "startDate" not in result.defaults_applied
    assert result.unused_keys == ()


@pytest.mark.parametrize(
    ("meta", "attribute", "expected"),
    [
        ({"purchaseTier": 20}, "session_count", 20),
        ({"purchaseTier": "30"}, "session_count", 30),
        ({"schedule": {"purchaseTier": 20}}, "session_count", 20),
        ({"preferredTimeSlot": "5 PM"}, "time_slot", time(17)),
        ({"classTime": "7:30 AM"}, "time_slot", time(7, 30)),
        ({"schedule": {"time": "18:00"}}, "time_slot", time(18)),
        ({"schedule": {"classTime": "6 PM"}}, "time_slot", time(18)),
        ({"preferredDate": "2026-12-02"}, "start_date", date(2026, 12, 2)),
        ({"date": "2026-12-03"}, "start_date", date(2026, 12, 3)),
        ({"schedule": {"date": "2026-12-04"}}, "start_date", date(2026, 12, 4)),
        ({"scheduleType": "weekdays"}, "schedule_mode", ScheduleMode.WEEKDAYS),
        ({"schedule_mode": "weekdays"}, "schedule_mode", ScheduleMode.WEEKDAYS),
        ({"schedule": {"mode": "sunday"}}, "schedule_mode", ScheduleMode.SUNDAY_ONLY),
        ({"schedule": {"type": "SUNDAY_ONLY"}}, "schedule_mode", ScheduleMode.SUNDAY_ONLY),
        ({"schedule": {"sessionDuration": 45}}, "session_duration", 45),
        ({"learningMode": "home"}, "learning_mode", LearningMode.HOME),
        ({"groupSize": "3"}, "group_size", 3),
        ({"groupSize": 2}, "group_size", 2),
        ({"schedule": {"groupSize": 2}}, "group_size", 2),
        ({"trainerId": TRAINER}, "preferred_trainer_id", uuid.UUID(TRAINER)),
        ({"trainerId": TRAINER.upper()}, "preferred_trainer_id", uuid.UUID(TRAINER)),
    ],
)
def test_every_name_is_read(meta: dict[str, Any], attribute: str, expected: object) -> None:
    base: dict[str, Any] = {} if "purchaseTier" in str(meta) else {"sessionCount": 10}
    assert getattr(plan(base | meta), attribute) == expected


@pytest.mark.parametrize(
    ("word", "mode"),
    [
        ("daily", ScheduleMode.DAILY),
        ("everyday", ScheduleMode.DAILY),
        ("Every Day", ScheduleMode.DAILY),
        ("WEEKDAY_DAILY", ScheduleMode.DAILY),
        ("weekday-daily", ScheduleMode.DAILY),
        ("weekdays", ScheduleMode.WEEKDAYS),
        ("WEEKDAYS", ScheduleMode.WEEKDAYS),
        ("sunday_only", ScheduleMode.SUNDAY_ONLY),
        ("sunday", ScheduleMode.SUNDAY_ONLY),
        ("SUNDAY_ONLY", ScheduleMode.SUNDAY_ONLY),
        ("Sunday Only", ScheduleMode.SUNDAY_ONLY),
        ("sunday-focus", ScheduleMode.SUNDAY_ONLY),
    ],
)
def test_mode_words(word: str, mode: ScheduleMode) -> None:
    assert plan({"sessionCount": 10, "scheduleMode": word}).schedule_mode is mode


@pytest.mark.parametrize("word", ["weekly", "weekday", "monday", "", "daily!", "\u0455unday"])
def test_unknown_mode_words_are_rejected(word: str) -> None:
    [error] = problems({"sessionCount": 10, "scheduleType": word})
    assert error["field"] == "scheduleType"
    assert error["message"].startswith("must be daily (or everyday, WEEKDAY_DAILY), weekdays")


@pytest.mark.parametrize(
    ("meta", "field", "message"),
    [
        (
            {"timeSlot": "4:00 PM", "schedule": {"timeSlot": "6:00 PM"}},
            "schedule.timeSlot",
            "'6:00 PM' disagrees with timeSlot '4:00 PM': send one of them, or the same "
            "value in both",
        ),
        (
            {"sessionCount": 20, "purchaseTier": 30},
            "purchaseTier",
            "30 disagrees with sessionCount 20",
        ),
        (
            {"startDate": "2026-12-01", "schedule": {"date": "2026-12-02"}},
            "schedule.date",
            "'2026-12-02' disagrees with startDate '2026-12-01'",
        ),
        (
            {"scheduleMode": "everyday", "scheduleType": "sunday"},
            "scheduleType",
            "'sunday' disagrees with scheduleMode 'everyday'",
        ),
        (
            {"preferredTimeSlot": "4 PM", "classTime": "5 PM"},
            "classTime",
            "'5 PM' disagrees with preferredTimeSlot '4 PM'",
        ),
        (
            {"learningMode": "home", "schedule": {"learningMode": "hybrid"}},
            "schedule.learningMode",
            "'hybrid' disagrees with learningMode 'home'",
        ),
    ],
)
def test_names_that_disagree_are_rejected_naming_both(
    meta: dict[str, Any], field: str, message: str
) -> None:
    base = {"sessionCount": 10} if "sessionCount" not in meta else {}
    errors = problems(base | meta)
    assert [e["field"] for e in errors] == [field]
    assert errors[0]["message"].startswith(message)


def test_names_that_agree_are_one_value_read_by_precedence() -> None:
    meta = {
        "sessionCount": 10,
        "purchaseTier": "10",
        "timeSlot": "4 PM",
        "schedule": {"timeSlot": "16:00", "mode": "daily", "startDate": "2026-12-01"},
        "scheduleType": "EVERYDAY",
        "date": "2026-12-01",
    }
    result = plan(meta)
    assert (result.session_count, result.time_slot) == (10, time(16))
    assert (result.schedule_mode, result.start_date) == (ScheduleMode.DAILY, date(2026, 12, 1))
    assert parse_metadata(meta).sources == {
        "sessionCount": "sessionCount",
        "timeSlot": "timeSlot",
        "startDate": "date",  # the top level comes before `schedule`
        "scheduleMode": "scheduleType",
    }
    assert parse_metadata({"purchaseTier": 20, "schedule": {"type": "sunday"}}).sources == {
        "sessionCount": "purchaseTier",
        "scheduleMode": "schedule.type",
    }


def test_precedence_is_documented_in_one_place() -> None:
    spec = {s.name: s for s in FIELDS}
    assert spec["timeSlot"].sources() == [
        ("timeSlot",),
        ("preferredTimeSlot",),
        ("classTime",),
        ("schedule", "timeSlot"),
        ("schedule", "preferredTimeSlot"),
        ("schedule", "classTime"),
        ("schedule", "time"),
    ]


def test_keys_not_read_are_kept_and_listed() -> None:
    result = plan(
        {
            "sessionCount": 10,
            "courseId": "c-1",
            "pricing": {"finalPrice": 4999.5},
            "coinsToRedeem": 0,
            "schedule": {"timeSlot": "4 PM", "slotLabel": "Evening"},
            "Timeslot": "5 PM",  # names are case-sensitive: this one is not read
        }
    )
    assert result.unused_top == ("Timeslot", "coinsToRedeem", "courseId", "pricing")
    assert result.unused_schedule == ("slotLabel",)
    assert result.unused_keys == (
        "Timeslot",
        "coinsToRedeem",
        "courseId",
        "pricing",
        "schedule.slotLabel",
    )
    assert result.time_slot == time(16)


@pytest.mark.parametrize("schedule", ["weekdays", ["4 PM"], 5, True])
def test_schedule_must_be_an_object(schedule: object) -> None:
    [error] = problems({"sessionCount": 10, "schedule": schedule})
    assert error["field"] == "schedule"
    assert error["message"].startswith("must be an object such as")


def test_hybrid_is_exactly_thirty_sessions() -> None:
    assert plan({"sessionCount": 30, "learningMode": "Hybrid"}).learning_mode is (
        LearningMode.HYBRID
    )
    assert problems({"purchaseTier": 20, "learningMode": "hybrid"}) == [
        {
            "field": "purchaseTier",
            "message": "is 20, but learningMode hybrid is exactly 30 sessions (18 online, 12 at "
            "home)",
        }
    ]


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"learningMode": "online"}, "learningMode"),
        ({"learningMode": 1}, "learningMode"),
        ({"groupSize": 0}, "groupSize"),
        ({"groupSize": 4}, "groupSize"),
        ({"groupSize": 2.5}, "groupSize"),
        ({"groupSize": "\u0662"}, "groupSize"),
        ({"groupSize": True}, "groupSize"),
        ({"trainerId": "trainer-7"}, "trainerId"),
        ({"trainerId": 7}, "trainerId"),
        ({"trainerId": "{" + TRAINER + "}"}, "trainerId"),
    ],
)
def test_bad_new_fields_are_rejected(meta: dict[str, Any], field: str) -> None:
    assert [e["field"] for e in problems({"sessionCount": 30} | meta)] == [field]


def test_every_problem_in_one_pass() -> None:
    """Field problems, conflicts and the rules across fields, all in one rejection."""
    errors = problems(
        {
            "sessionCount": 10,
            "learningMode": "hybrid",
            "timeSlot": "7 AM - 8 AM",
            "sessionDuration": 90,
            "startDate": "9999-01-01",
            "groupSize": 7,
            "scheduleMode": "daily",
            "schedule": {"mode": "sunday"},
        }
    )
    assert [e["field"] for e in errors] == [
        "schedule.mode",  # conflict
        "groupSize",  # field
        "sessionDuration",  # 90 minutes against the slot's 60 (the mode conflict hid it once)
        "startDate",  # more than a year ahead
        "sessionCount",  # hybrid needs 30
    ]
    errors = problems(
        {
            "learningMode": "hybrid",
            "timeSlot": "7 AM - 8 AM",
            "sessionDuration": 90,
            "groupSize": 2,
        }
    )
    assert [e["field"] for e in errors] == ["sessionCount", "sessionDuration"]


def test_two_bad_fields_and_a_rule_across_fields_in_one_rejection() -> None:
    """Issue 14's case: fixing two fields must not reveal a third problem. A bad mode does
    not hide the midnight rule (the mode only matters for a default duration)."""
    errors = problems(
        {
            "sessionCount": 25,
            "scheduleMode": "fortnightly",
            "timeSlot": "11:30 PM",
            "sessionDuration": 60,
        }
    )
    assert [e["field"] for e in errors] == ["sessionCount", "scheduleMode", "timeSlot"]
    assert errors[2]["message"] == "a 60-minute session at 23:30 would end after midnight"


# Independent ways to spoil a valid payment, each reported on its own field; the midnight and
# start-date ones are rules across fields.
SPOILERS: dict[str, dict[str, Any]] = {
    "sessionCount": {"sessionCount": 25},
    "scheduleMode": {"scheduleMode": "fortnightly"},
    "timeSlot": {"timeSlot": "11:30 PM", "sessionDuration": 60},
    "startDate": {"startDate": "9999-01-01"},
    "groupSize": {"groupSize": 7},
    "learningMode": {"learningMode": "online"},
    "trainerId": {"trainerId": "Ravi"},
    "upgrade": {"upgrade": "yes"},
}


@given(st.sets(st.sampled_from(sorted(SPOILERS)), min_size=1))
def test_every_problem_is_reported_in_the_first_rejection(spoiled: set[str]) -> None:
    meta: dict[str, Any] = {"sessionCount": 10, "timeSlot": "4:00 PM"}
    for name in spoiled:
        meta |= SPOILERS[name]
    fields = [e["field"] for e in problems(meta)]
    assert sorted(fields) == sorted(spoiled)


def test_hybrid_sessions_follow_the_old_booking_rule() -> None:
    sessions = build_schedule(
        start=date(2026, 12, 1),
        count=30,
        mode=ScheduleMode.DAILY,
        slot=time(16),
        duration_minutes=60,
        zone=zone_named("Asia/Kolkata"),
        holidays=set(),
        learning_mode=LearningMode.HYBRID,
    )
    where = [s.delivery for s in sessions]
    assert where[:6] == [Delivery.ONLINE] * 6
    assert where[6:10] == [Delivery.ONLINE, Delivery.HOME, Delivery.ONLINE, Delivery.HOME]
    assert (where.count(Delivery.ONLINE), where.count(Delivery.HOME)) == (18, 12)
    assert all(a != b for a, b in pairwise(where[6:]))  # alternating from 7
    assert {delivery_for(LearningMode.HOME, n) for n in range(1, 31)} == {Delivery.HOME}


def app_label(mode_word: str) -> str:
    """The learnings screen's rule for its schedule label (old student-service, as a fact)."""
    if "sunday" in mode_word.lower():
        return "Sunday Only"
    if mode_word.lower() == "everyday":
        return "Everyday"
    return mode_word[:1].upper() + mode_word[1:].lower()


@pytest.mark.parametrize("mode", list(ScheduleMode))
def test_learnings_metadata_speaks_the_apps_words(mode: ScheduleMode) -> None:
    meta = learnings_metadata(
        session_count=20,
        time_slot=time(18),
        first_day=date(2026, 12, 6),
        mode=mode,
        group_size=2,
        learning_mode=LearningMode.HYBRID,
    )
    assert meta["schedule"] == {
        "timeSlot": "18:00",
        "startDate": "2026-12-06",
        "date": "2026-12-06",
        "mode": APP_MODE_WORDS[mode],
    }
    assert (meta["sessionCount"], meta["timeSlot"], meta["startDate"]) == (
        20,
        "18:00",
        "2026-12-06",
    )
    assert (meta["groupSize"], meta["learningMode"]) == (2, "hybrid")
    assert meta["scheduleType"] == APP_MODE_LABELS[mode]
    # The screen derives the same label from any of the words it reads.
    for word in (meta["schedule"]["mode"], meta["scheduleType"], meta["scheduleMode"]):
        assert app_label(word) == APP_MODE_LABELS[mode]
    assert meta["isSundayOnly"] is (mode is ScheduleMode.SUNDAY_ONLY)


# Where each field may be written, and forms of the same value.
PLACES: dict[str, list[tuple[str, ...]]] = {s.name: s.sources() for s in FIELDS}
FORMS: dict[str, dict[Any, list[object]]] = {
    "sessionCount": {10: [10, "10", 10.0], 20: [20, "20"], 30: [30, " 30 "]},
    "timeSlot": {time(16): ["4 PM", "4:00 PM", "16:00"], time(9, 30): ["9:30 AM", "09:30"]},
    "scheduleMode": {
        ScheduleMode.DAILY: ["daily", "everyday", "WEEKDAY_DAILY"],
        ScheduleMode.WEEKDAYS: ["weekdays", "Weekdays"],
        ScheduleMode.SUNDAY_ONLY: ["sunday_only", "sunday", "SUNDAY_ONLY"],
    },
    "groupSize": {1: [1, "1"], 2: [2, "2"], 3: [3, "3"]},
}


@st.composite
def scattered(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Metadata with each field at one or more of its places (in any of its forms), the
    values it must plan to, and maybe one place changed to another value: then the places
    that must be reported (each that disagrees with the first place in precedence)."""
    meta: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    conflict: list[str] = []
    for name, values in FORMS.items():
        value = draw(st.sampled_from(sorted(values, key=str)))
        expected[name] = value
        places = draw(st.lists(st.sampled_from(PLACES[name]), min_size=1, max_size=3, unique=True))
        for path in places:
            target = meta if len(path) == 1 else meta.setdefault("schedule", {})
            target[path[-1]] = draw(st.sampled_from(values[value]))
        if not conflict and len(places) > 1 and draw(st.booleans()):
            other = draw(st.sampled_from([v for v in values if v != value]))
            changed = draw(st.sampled_from(places))
            target = meta if len(changed) == 1 else meta["schedule"]
            target[changed[-1]] = values[other][0]
            ordered = sorted(places, key=PLACES[name].index)
            conflict = [
                ".".join(path)
                for path in ordered[1:]
                if changed in (path, ordered[0])  # differs from the first in precedence
            ]
    return meta, expected, conflict


@given(scattered())
def test_any_placement_of_agreeing_names_plans_the_same(
    case: tuple[dict[str, Any], dict[str, Any], list[str]],
) -> None:
    meta, expected, conflict = case
    if conflict:
        errors = problems(meta)
        assert [e["field"] for e in errors] == conflict
        assert all("disagrees with" in e["message"] for e in errors)
        return
    result = plan(meta)
    assert result.session_count == expected["sessionCount"]
    assert result.time_slot == expected["timeSlot"]
    assert result.schedule_mode is expected["scheduleMode"]
    assert result.group_size == expected["groupSize"]
    assert result.unused_keys == ()


@given(
    st.dictionaries(
        st.sampled_from(
            ["learningMode", "groupSize", "trainerId", "purchaseTier", "scheduleType", "x"]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.text(max_size=40),
            st.sampled_from(["home", "hybrid", "HYBRID", TRAINER, "2", "everyday"]),
            st.floats(allow_nan=False),
        ),
    ),
    st.sampled_from([10, 20, 30]),
)
def test_new_fields_plan_or_are_rejected_clearly(extra: dict[str, Any], count: int) -> None:
    meta = {"sessionCount": count} | extra
    try:
        result = plan(meta)
    except InvalidPurchaseError as exc:
        assert exc.errors and all(e["field"] and e["message"] for e in exc.errors)
    else:
        assert result.group_size in (1, 2, 3)
        assert result.learning_mode is LearningMode.HOME or result.session_count == 30
        assert ("x" in extra) == ("x" in result.unused_keys)
