"""Payment metadata -> a validated purchase plan. Pure: no I/O, no clock (today is an argument).

The app (and the old services) write the same things under several names, at the top level
of `payments.metadata` or inside its `schedule` object. FIELDS lists every field, its names and
their precedence: the canonical name, then its aliases, at the top level; then the same names,
then the schedule-only short names, inside `schedule`. Every name present is validated; when
two names for a field hold values that differ (after parsing: "4 PM" and "16:00" agree), the
payment is rejected with both fields and both values named, never a silent choice. JSON null
counts as absent. Keys the pipeline does not read are kept with the purchase and listed.

  field            names (precedence order)                          default
  sessionCount     sessionCount, purchaseTier                        required, no default
  timeSlot         timeSlot, preferredTimeSlot, classTime;           KC_DEFAULT_TIME_SLOT
                   schedule.time
  startDate        startDate, preferredDate, date                    next valid day
  scheduleMode     scheduleMode, scheduleType, schedule_mode;        daily
                   schedule.mode, schedule.type
  sessionDuration  sessionDuration                                   slot range, else 60 (80)
  upgrade          upgrade                                           false
  learningMode     learningMode                                      home
  groupSize        groupSize                                         1
  trainerId        trainerId                                         none
Every default that is used is named in `PurchasePlan.defaults_applied` (and stored). A
rejection lists every problem found in one pass: each field, and each cross-field rule
(duration against slot, midnight, start date, hybrid count) whose inputs are valid.

Bad input is refused before it can cost anything: the metadata's JSON text is at most
MAX_METADATA_BYTES and MAX_METADATA_DEPTH levels deep (checked before decoding); numbers are
decoded as Decimal (never binary floats) and must be whole where a count is expected; digits
are ASCII 0-9 in every field; a start date more than a year ahead is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import date, time, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from workers.errors import InvalidPurchaseError, ScheduleError
from workers.rules.schedule import (
    HYBRID_SESSIONS,
    LearningMode,
    ScheduleMode,
    default_duration,
    next_valid_day,
    slot_end,
)

MAX_TEXT = 200  # longer strings are certainly not one of the formats we accept
# What the app sends is well under 2 KiB and 3 levels deep; anything near these limits is not
# a payment form. Both are checked on the JSON text, before it is decoded.
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 8


class RejectReason(StrEnum):
    """Why a payment could not become a purchase (payment_rejections.reason)."""

    INVALID_METADATA = "invalid_metadata"
    INVALID_TIMEZONE = "invalid_timezone"
    ACTIVE_PURCHASE_EXISTS = "active_purchase_exists"
    NO_PURCHASE_TO_UPGRADE = "no_purchase_to_upgrade"
    UPGRADE_NOT_LARGER = "upgrade_not_larger"
    UPGRADE_CHANGES_MODE = "upgrade_changes_mode"


def _invalid(field: str, message: str, *, keep_metadata: bool = True) -> InvalidPurchaseError:
    return InvalidPurchaseError(
        RejectReason.INVALID_METADATA,
        [{"field": field, "message": message}],
        keep_metadata=keep_metadata,
    )


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON text, without decoding it (strings skipped)."""
    depth = deepest = 0
    for token in _JSON_BRACKETS.findall(text):
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


_JSON_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _json_int(text: str) -> int | Decimal:
    # Short integers as int; long ones as Decimal (int() refuses more than 4,300 digits).
    return int(text) if len(text) <= 18 else Decimal(text)


def decode_metadata(text: str | None, size: int) -> object:
    """payments.metadata as JSON text -> Python values (objects, lists, str, int, Decimal).

    The size (bytes of the text) and the nesting depth are checked before anything is
    decoded, so a huge or deeply nested payload costs neither memory nor recursion.
    """
    if size > MAX_METADATA_BYTES or text is None:
        raise _invalid(
            "metadata",
            f"is {size:,} bytes of JSON; the limit is {MAX_METADATA_BYTES:,} bytes",
            keep_metadata=False,
        )
    depth = json_depth(text)
    if depth > MAX_METADATA_DEPTH:
        raise _invalid(
            "metadata",
            f"nests {depth} levels deep; the limit is {MAX_METADATA_DEPTH} levels",
            keep_metadata=False,
        )
    try:
        return json.loads(
            text, parse_float=Decimal, parse_int=_json_int, parse_constant=_no_constant
        )
    except ValueError as exc:
        raise _invalid("metadata", f"is not valid JSON: {str(exc)[:200]}") from None


@dataclass(frozen=True)
class TimeSlot:
    start: time
    end: time | None = None  # time(0) is midnight at the end of the day ("11 PM - 12 AM")

    @property
    def minutes(self) -> int | None:
        if self.end is None:
            return None
        end = self.end.hour * 60 + self.end.minute or 24 * 60
        return end - (self.start.hour * 60 + self.start.minute)


# re.ASCII: digits are 0-9 only, in every field (Python's \d takes any Unicode digit).
_CLOCK = re.compile(
    r"^\s*(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?\s*(?P<meridiem>[ap]\.?\s*m\.?)?\s*$",
    re.IGNORECASE | re.ASCII,
)


def parse_clock(text: str) -> time:
    """'4:00 PM', '4 PM', '4pm', '16:00', '07:30' -> time. Raises ValueError with the reason."""
    match = _CLOCK.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a time like '4:00 PM', '4 PM' or '16:00'")
    hour = int(match["hour"])
    minute = int(match["minute"] or 0)
    meridiem = match["meridiem"]
    if minute > 59:
        raise ValueError(f"{text!r}: minutes must be 00..59")
    if meridiem:
        if not 1 <= hour <= 12:
            raise ValueError(f"{text!r}: with AM/PM the hour must be 1..12")
        is_pm = meridiem.lower().startswith("p")
        hour = hour % 12 + (12 if is_pm else 0)
    else:
        if match["minute"] is None:
            raise ValueError(f"{text!r}: a 24-hour time needs minutes ('16:00'), or add AM/PM")
        if hour > 23:
            raise ValueError(f"{text!r}: the hour must be 0..23")
    return time(hour, minute)


def parse_time_slot(value: object) -> TimeSlot:
    if isinstance(value, TimeSlot):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a string like '4:00 PM', got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ValueError(f"is {len(value)} characters long; expected a time like '4:00 PM'")
    parts = re.split(r"\s*(?:-|\u2013|\u2014|\bto\b)\s*", value.strip(), maxsplit=1, flags=re.ASCII)
    start = parse_clock(parts[0])
    if len(parts) == 1:
        return TimeSlot(start)
    end = parse_clock(parts[1])
    if end == start or (end < start and end != time(0)):  # 00:00 as an end is midnight
        raise ValueError(f"{value!r}: the end must be after the start, on the same day")
    return TimeSlot(start, end)


def whole_number(value: object, expected: str) -> int:
    """A JSON number or a string of ASCII digits -> int; ValueError naming `expected`.

    Numbers that are not whole (10.5, and 10.000000000000000001, which a binary float would
    round to 10) are refused; so are booleans and Arabic-Indic or full-width digits.
    """
    if isinstance(value, bool):
        raise ValueError(f"must be {expected}, not a boolean")
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 9):
            raise ValueError(f"must be {expected} (digits 0-9), got {_shown(value)}")
        return int(text)
    if isinstance(value, int):
        return value
    if isinstance(value, float | Decimal):
        number = Decimal(value)  # exact, also for a float
        if not number.is_finite() or number != number.to_integral_value():
            raise ValueError(f"must be {expected}, a whole number, got {_shown(value)}")
        # copy_abs and < do no arithmetic: no overflow at 1E+999999999, and no giant int.
        if number.copy_abs() > 10**9:
            raise ValueError(f"must be {expected}, got {_shown(value)}")
        return int(number)
    raise ValueError(f"must be {expected}, got {_shown(value)}")


def _session_count(value: object) -> int:
    count = whole_number(value, "10, 20 or 30")
    if count not in (10, 20, 30):
        raise ValueError(f"must be 10, 20 or 30, got {count}")
    return count


def _start_date(value: object) -> date:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value.strip()):
        raise ValueError(f"must be a date 'YYYY-MM-DD', got {_shown(value)}")
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a real calendar date") from None


# Mode words, compared without case or separators ("Sunday-Only" = "sunday_only" = "SUNDAY ONLY"),
# in ASCII only (the SQL half, kc_mode_of, reads them for a reschedule;
# tests/database/test_rule_pairs.py).
# WEEKDAY_DAILY is every day, as the old booking service's schedule generator had it.
MODE_WORDS: dict[str, ScheduleMode] = {
    "daily": ScheduleMode.DAILY,
    "everyday": ScheduleMode.DAILY,
    "weekdaydaily": ScheduleMode.DAILY,
    "weekdays": ScheduleMode.WEEKDAYS,
    "sundayonly": ScheduleMode.SUNDAY_ONLY,
    "sunday": ScheduleMode.SUNDAY_ONLY,
    "sundayfocus": ScheduleMode.SUNDAY_ONLY,
}
# What the app's learnings screen shows: it reads schedule.mode (then scheduleType) and shows
# "Sunday Only" for any word with "sunday", "Everyday" for "everyday", else the word
# capitalised. These words and labels keep that screen right for every mode.
APP_MODE_WORDS: dict[ScheduleMode, str] = {
    ScheduleMode.DAILY: "everyday",
    ScheduleMode.WEEKDAYS: "weekdays",
    ScheduleMode.SUNDAY_ONLY: "sunday",
}
APP_MODE_LABELS: dict[ScheduleMode, str] = {
    ScheduleMode.DAILY: "Everyday",
    ScheduleMode.WEEKDAYS: "Weekdays",
    ScheduleMode.SUNDAY_ONLY: "Sunday Only",
}
_SEPARATORS = re.compile(r"[\s_\-]+", re.ASCII)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)


def mode_of(word: str) -> ScheduleMode | None:
    """The schedule mode a word names (MODE_WORDS), None for any other text; kc_mode_of in SQL.

    ASCII only: str.lower() and str.strip() know Unicode (the Kelvin sign lowers to 'k',
    U+00A0 is stripped), kc_mode_of does not, and the two must read the same words.
    """
    if len(word) > MAX_TEXT or not word.isascii():
        return None
    return MODE_WORDS.get(_SEPARATORS.sub("", word.lower()))


def _schedule_mode(value: object) -> ScheduleMode:
    if isinstance(value, str):
        mode = mode_of(value)
        if mode is not None:
            return mode
    raise ValueError(
        "must be daily (or everyday, WEEKDAY_DAILY), weekdays, or sunday_only (or sunday, "
        f"SUNDAY_ONLY), got {_shown(value)}"
    )


def _learning_mode(value: object) -> LearningMode:
    if isinstance(value, str) and len(value) <= MAX_TEXT:
        try:
            return LearningMode(value.strip().lower())
        except ValueError:
            pass
    raise ValueError(f"must be home or hybrid, got {_shown(value)}")


def _group_size(value: object) -> int:
    size = whole_number(value, "1, 2 or 3")
    if not 1 <= size <= 3:
        raise ValueError(f"must be 1, 2 or 3, got {size}")
    return size


def _trainer_id(value: object) -> UUID:
    if isinstance(value, UUID):
        return value
    if isinstance(value, str) and _UUID.fullmatch(value.strip().lower()):
        return UUID(value.strip())
    raise ValueError(f"must be a trainer id (a UUID), got {_shown(value)}")


def _duration(value: object) -> int:
    value = whole_number(value, "a whole number of minutes")
    if not 15 <= value <= 240:
        raise ValueError(f"must be between 15 and 240 minutes, got {value}")
    return value


def _strict_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_shown(value)}")
    return value


def _shown(value: object) -> str:
    text = str(value) if isinstance(value, Decimal) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class FieldSpec:
    """One field of the metadata: its names, where they are read, and its validator."""

    name: str  # canonical, at the top level
    attribute: str  # in PaymentMetadata and PurchasePlan
    adapter: TypeAdapter[Any]  # pydantic, wrapping the field's validator
    aliases: tuple[str, ...] = ()  # other names, at the top level and inside `schedule`
    schedule_only: tuple[str, ...] = ()  # names read only inside `schedule`

    def sources(self) -> list[tuple[str, ...]]:
        """Every place the field may be, in precedence order."""
        names = (self.name, *self.aliases)
        return [(n,) for n in names] + [("schedule", n) for n in (*names, *self.schedule_only)]


def _spec(
    name: str,
    attribute: str,
    validator: Callable[[object], Any],
    aliases: tuple[str, ...] = (),
    schedule_only: tuple[str, ...] = (),
) -> FieldSpec:
    adapter: TypeAdapter[Any] = TypeAdapter(Annotated[Any, BeforeValidator(validator)])
    return FieldSpec(name, attribute, adapter, aliases, schedule_only)


# The order is the order of the error list.
FIELDS: tuple[FieldSpec, ...] = (
    _spec("sessionCount", "session_count", _session_count, ("purchaseTier",)),
    _spec("timeSlot", "time_slot", parse_time_slot, ("preferredTimeSlot", "classTime"), ("time",)),
    _spec("startDate", "start_date", _start_date, ("preferredDate", "date")),
    _spec(
        "scheduleMode",
        "schedule_mode",
        _schedule_mode,
        ("scheduleType", "schedule_mode"),
        ("mode", "type"),
    ),
    _spec("sessionDuration", "session_duration", _duration),
    _spec("upgrade", "upgrade", _strict_bool),
    _spec("learningMode", "learning_mode", _learning_mode),
    _spec("groupSize", "group_size", _group_size),
    _spec("trainerId", "trainer_id", _trainer_id),
)
TOP_LEVEL_NAMES = frozenset(
    {"schedule"} | {n for spec in FIELDS for n in (spec.name, *spec.aliases)}
)
SCHEDULE_NAMES = frozenset(
    n for spec in FIELDS for n in (spec.name, *spec.aliases, *spec.schedule_only)
)


class PaymentMetadata(BaseModel):
    """The metadata's fields, each read from wherever it was sent, validated and agreed."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    session_count: Literal[10, 20, 30]
    time_slot: TimeSlot | None = None
    start_date: date | None = None
    schedule_mode: ScheduleMode | None = None
    session_duration: int | None = Field(None, ge=15, le=240)
    upgrade: bool = False
    learning_mode: LearningMode | None = None
    group_size: int | None = Field(None, ge=1, le=3)
    trainer_id: UUID | None = None
    # Where each field was read from (its first name in precedence order), and what was not
    # read at all.
    sources: dict[str, str] = Field(default_factory=dict)
    unused_keys: tuple[str, ...] = ()


@dataclass
class Reading:
    """What read_metadata found: valid values, where from, problems, and unread keys."""

    values: dict[str, Any] = field(default_factory=dict)  # attribute -> typed value
    sources: dict[str, str] = field(default_factory=dict)  # canonical name -> path read
    given: set[str] = field(default_factory=set)  # canonical names present, valid or not
    errors: list[dict[str, str]] = field(default_factory=list)
    unused_top: tuple[str, ...] = ()
    unused_schedule: tuple[str, ...] = ()

    @property
    def unused_keys(self) -> tuple[str, ...]:
        return self.unused_top + tuple(f"schedule.{k}" for k in self.unused_schedule)


def _validated(spec: FieldSpec, value: object) -> Any:
    try:
        return spec.adapter.validate_python(value)
    except ValidationError as exc:
        message = str(exc.errors(include_url=False)[0]["msg"])
        raise ValueError(message.removeprefix("Value error, ")) from None


def read_metadata(raw: object) -> Reading:
    """Every field from every name it may have, validated; conflicts between names are
    problems. Never raises: the caller adds its own checks and reports all of them."""
    reading = Reading()
    if not isinstance(raw, Mapping):
        reading.errors.append(
            {"field": "metadata", "message": f"must be a JSON object, got {type(raw).__name__}"}
        )
        return reading
    schedule = raw.get("schedule")
    if schedule is None:
        schedule = {}
    elif not isinstance(schedule, Mapping):
        reading.errors.append(
            {
                "field": "schedule",
                "message": 'must be an object such as {"timeSlot": "6:00 PM", "startDate": '
                f'"2026-12-01"}}, got {_shown(schedule)}',
            }
        )
        schedule = {}
    for spec in FIELDS:
        problems_before = len(reading.errors)
        found: list[tuple[str, object, Any]] = []
        for path in spec.sources():
            value = (raw if len(path) == 1 else schedule).get(path[-1])
            if value is None:
                continue
            label = ".".join(path)
            reading.given.add(spec.name)
            try:
                found.append((label, value, _validated(spec, value)))
            except ValueError as exc:
                reading.errors.append({"field": label, "message": str(exc)})
        for label, value, parsed in found[1:]:
            first_label, first_raw, first_value = found[0]
            if parsed != first_value:
                reading.errors.append(
                    {
                        "field": label,
                        "message": f"{_shown(value)} disagrees with {first_label} "
                        f"{_shown(first_raw)}: send one of them, or the same value in both",
                    }
                )
        if found and len(reading.errors) == problems_before:
            reading.values[spec.attribute] = found[0][2]
            reading.sources[spec.name] = found[0][0]
    # Sorted: jsonb keeps its own key order, so the order sent is not known anyway.
    reading.unused_top = tuple(sorted(str(k) for k in raw if k not in TOP_LEVEL_NAMES))
    reading.unused_schedule = tuple(sorted(str(k) for k in schedule if k not in SCHEDULE_NAMES))
    return reading


def parse_metadata(raw: object) -> PaymentMetadata:
    """Validate raw metadata; InvalidPurchaseError lists every problem, field by field."""
    reading = read_metadata(raw)
    errors = reading.errors + _required(reading)
    if errors:
        raise InvalidPurchaseError(RejectReason.INVALID_METADATA, errors)
    return PaymentMetadata(
        **reading.values, sources=reading.sources, unused_keys=reading.unused_keys
    )


def _required(reading: Reading) -> list[dict[str, str]]:
    if "sessionCount" in reading.given:
        return []
    return [{"field": "sessionCount", "message": "is required (10, 20 or 30); there is no default"}]


class PurchasePlan(BaseModel):
    """Everything a purchase row needs, in typed fields (checked again by pydantic)."""

    model_config = ConfigDict(frozen=True)

    session_count: Literal[10, 20, 30]
    start_date: date
    time_slot: time
    schedule_mode: ScheduleMode
    session_duration: int = Field(ge=15, le=240)
    upgrade: bool
    defaults_applied: tuple[str, ...]
    learning_mode: LearningMode = LearningMode.HOME
    learning_mode_given: bool = False
    group_size: int = Field(1, ge=1, le=3)
    preferred_trainer_id: UUID | None = None
    # Keys not read, at the top level and inside `schedule`: kept with the purchase.
    unused_top: tuple[str, ...] = ()
    unused_schedule: tuple[str, ...] = ()

    @property
    def unused_keys(self) -> tuple[str, ...]:
        return self.unused_top + tuple(f"schedule.{k}" for k in self.unused_schedule)


def latest_start(today: date) -> date:
    """The latest start date accepted on `today`: one year ahead (28 February for 29 February)."""
    if today.year >= date.max.year:
        return date.max
    try:
        return today.replace(year=today.year + 1)
    except ValueError:
        return today.replace(year=today.year + 1, day=28)


def plan_purchase(
    raw: object, *, today: date, holidays: Collection[date], default_time_slot: time
) -> PurchasePlan:
    """Metadata + the student's local today -> PurchasePlan, or InvalidPurchaseError listing
    every problem (fields, conflicts between names, and the rules across fields).

    The first session is on the first day allowed by the schedule mode, not a holiday, on or
    after max(startDate, tomorrow): a missing or past start date moves forward; one more than
    a year ahead is refused.
    """
    reading = read_metadata(raw)
    planning = _Planning(reading, reading.errors + _required(reading))
    count = planning.value("sessionCount")
    mode = planning.value("scheduleMode", ScheduleMode.DAILY)
    slot = planning.value("timeSlot", TimeSlot(default_time_slot))
    learning = planning.value("learningMode", LearningMode.HOME)
    group = planning.value("groupSize", 1)
    upgrade = planning.value("upgrade", False, listed=False)
    trainer = planning.value("trainerId")
    duration = planning.duration(slot, mode)
    asked_start = planning.start_date(today)
    planning.check_hybrid(learning, count)
    if planning.errors:
        raise InvalidPurchaseError(RejectReason.INVALID_METADATA, planning.errors)

    # Holidays on every day for years are not the payment's fault: ScheduleError fails the
    # job at once (held for an operator, replayable), it does not reject the payment.
    assert asked_start is not None and mode is not None, "each missing value has its problem"
    start = next_valid_day(max(asked_start, today + timedelta(days=1)), mode, holidays)
    # Every value is known here (any missing one made a problem above); pydantic checks the
    # typed plan once more, so a slip in this function cannot write a wrong row.
    return PurchasePlan.model_validate(
        {
            "session_count": count,
            "start_date": start,
            "time_slot": slot.start,
            "schedule_mode": mode,
            "session_duration": duration,
            "upgrade": upgrade,
            "defaults_applied": tuple(planning.defaults),
            "learning_mode": learning,
            "learning_mode_given": "learningMode" in reading.given,
            "group_size": group,
            "preferred_trainer_id": trainer,
            "unused_top": reading.unused_top,
            "unused_schedule": reading.unused_schedule,
        }
    )


@dataclass
class _Planning:
    """plan_purchase's working state: what was read, every problem found so far and the
    defaults used, each in the order met. The rules across fields run only on inputs that
    are valid (an invalid one has its problem listed already)."""

    reading: Reading
    errors: list[dict[str, str]]
    defaults: list[str] = field(default_factory=list)

    def value(self, name: str, default: Any = None, *, listed: bool = True) -> Any:
        """The field's value; its default when absent (named in defaults_applied); None
        when it was given but is invalid (its problem is listed already)."""
        spec = next(s for s in FIELDS if s.name == name)
        if spec.attribute in self.reading.values:
            return self.reading.values[spec.attribute]
        if name in self.reading.given:
            return None
        if default is not None and listed:
            self.defaults.append(name)
        return default

    def problem(self, name: str, message: str) -> None:
        self.errors.append({"field": self.reading.sources.get(name, name), "message": message})

    def duration(self, slot: TimeSlot | None, mode: ScheduleMode | None) -> int | None:
        """Minutes per session: sent, else the slot's range, else the mode's default; and
        checked against the slot's range, 15..240 and midnight."""
        reading = self.reading
        sent_invalid = (
            "sessionDuration" in reading.given and "session_duration" not in reading.values
        )
        if slot is None or sent_invalid:
            return None  # its problem is listed already
        # The mode matters only for a default duration: a bad mode does not hide the checks of
        # a duration that was sent (or read from the slot's range).
        asked = reading.values.get("session_duration")
        duration: int | None = None
        if asked is not None and slot.minutes is not None and asked != slot.minutes:
            self.problem(
                "sessionDuration",
                f"is {asked} minutes but {reading.sources['timeSlot']} spans "
                f"{slot.minutes} minutes",
            )
        elif asked is not None:
            duration = asked
        elif slot.minutes is not None:
            duration = slot.minutes
        elif mode is not None:
            duration = default_duration(mode)
            self.defaults.append("sessionDuration")
        if duration is not None and not 15 <= duration <= 240:
            self.problem("timeSlot", f"spans {duration} minutes; expected 15..240")
            return None
        if duration is not None:
            try:
                slot_end(slot.start, duration)
            except ScheduleError as exc:
                self.problem("timeSlot", str(exc))
        return duration

    def start_date(self, today: date) -> date | None:
        """The start date asked for (tomorrow when none was sent); a problem when it is
        more than a year ahead."""
        asked: date | None = self.value("startDate")
        latest = latest_start(today)
        if "startDate" not in self.reading.given:
            self.defaults.append("startDate")
            return today + timedelta(days=1)
        if asked is not None and asked > latest:
            self.problem(
                "startDate",
                f"{asked} is more than a year ahead; the latest start accepted today is {latest}",
            )
            return None
        return asked

    def check_hybrid(self, learning: LearningMode | None, count: int | None) -> None:
        if learning is LearningMode.HYBRID and count is not None and count != HYBRID_SESSIONS:
            self.problem(
                "sessionCount",
                f"is {count}, but learningMode hybrid is exactly {HYBRID_SESSIONS} sessions "
                "(18 online, 12 at home)",
            )


def learnings_metadata(
    *,
    session_count: int,
    time_slot: time,
    first_day: date,
    mode: ScheduleMode,
    group_size: int,
    learning_mode: LearningMode,
) -> dict[str, Any]:
    """What the app's learnings screen reads from trainer_allocations.metadata, in its words
    (and the two keys older readers look for: startDate and schedule.timeSlot)."""
    slot = time_slot.strftime("%H:%M")
    start = first_day.isoformat()
    return {
        "schedule": {
            "timeSlot": slot,
            "startDate": start,
            "date": start,
            "mode": APP_MODE_WORDS[mode],
        },
        "sessionCount": session_count,
        "timeSlot": slot,
        "startDate": start,
        "date": start,
        "preferredTimeSlot": slot,
        "preferredDate": start,
        "scheduleMode": APP_MODE_WORDS[mode],
        "scheduleType": APP_MODE_LABELS[mode],
        "isSundayOnly": mode is ScheduleMode.SUNDAY_ONLY,
        "groupSize": group_size,
        "learningMode": learning_mode.value,
    }
