"""Payment metadata -> a validated purchase plan. Pure: no I/O, no clock (today is an argument).

What the app sends (`payments.metadata`):
  sessionCount     10 | 20 | 30                      required, no default
  timeSlot         "4:00 PM" | "16:00" | "4 PM" | "7:00 AM - 8:00 AM"
                   default: KC_DEFAULT_TIME_SLOT (16:00)
  startDate        "YYYY-MM-DD"                      default: next valid day (student's zone)
  scheduleMode     daily | weekdays | sunday_only    default: daily
  sessionDuration  minutes, 15..240                  default: slot range, else 60 (80 sunday_only)
  upgrade          true for a larger pack of an existing purchase
Every default that is used is named in `PurchasePlan.defaults_applied` (and stored).

Bad input is refused before it can cost anything: the metadata's JSON text is at most
MAX_METADATA_BYTES and MAX_METADATA_DEPTH levels deep (checked before decoding); numbers are
decoded as Decimal (never binary floats) and must be whole where a count is expected; digits
are ASCII 0-9 in every field; a start date more than a year ahead is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date, time, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from workers.errors import InvalidPurchaseError, ScheduleError
from workers.schedule import ScheduleMode, default_duration, next_valid_day, slot_end

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


def _start_date(value: object) -> date | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value.strip()):
        raise ValueError(f"must be a date 'YYYY-MM-DD', got {_shown(value)}")
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a real calendar date") from None


def _schedule_mode(value: object) -> ScheduleMode | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= MAX_TEXT:
        normalised = value.strip().lower().replace("-", "_").replace(" ", "_")
        try:
            return ScheduleMode(normalised)
        except ValueError:
            pass
    choices = ", ".join(mode.value for mode in ScheduleMode)
    raise ValueError(f"must be one of {choices}, got {_shown(value)}")


def _duration(value: object) -> int | None:
    if value is None:
        return None
    value = whole_number(value, "a whole number of minutes")
    if not 15 <= value <= 240:
        raise ValueError(f"must be between 15 and 240 minutes, got {value}")
    return value


def _strict_bool(value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_shown(value)}")
    return value


def _shown(value: object) -> str:
    text = str(value) if isinstance(value, Decimal) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class PaymentMetadata(BaseModel):
    """The metadata the app attaches to a payment, validated. Unknown keys are ignored."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", populate_by_name=True, arbitrary_types_allowed=True
    )

    session_count: Annotated[int, BeforeValidator(_session_count)] = Field(alias="sessionCount")
    time_slot: Annotated[
        TimeSlot | None, BeforeValidator(lambda v: None if v is None else parse_time_slot(v))
    ] = Field(None, alias="timeSlot")
    start_date: Annotated[date | None, BeforeValidator(_start_date)] = Field(
        None, alias="startDate"
    )
    schedule_mode: Annotated[ScheduleMode | None, BeforeValidator(_schedule_mode)] = Field(
        None, alias="scheduleMode"
    )
    session_duration: Annotated[int | None, BeforeValidator(_duration)] = Field(
        None, alias="sessionDuration"
    )
    upgrade: Annotated[bool, BeforeValidator(_strict_bool)] = False


@dataclass(frozen=True)
class PurchasePlan:
    """Everything a purchase row needs, in typed fields."""

    session_count: int
    start_date: date
    time_slot: time
    schedule_mode: ScheduleMode
    session_duration: int
    upgrade: bool
    defaults_applied: tuple[str, ...]


def parse_metadata(raw: object) -> PaymentMetadata:
    """Validate raw metadata; InvalidPurchaseError lists every problem, field by field."""
    if not isinstance(raw, Mapping):
        raise InvalidPurchaseError(
            RejectReason.INVALID_METADATA,
            [{"field": "metadata", "message": f"must be a JSON object, got {type(raw).__name__}"}],
        )
    try:
        return PaymentMetadata.model_validate(dict(raw))
    except ValidationError as exc:
        raise InvalidPurchaseError(RejectReason.INVALID_METADATA, _errors(exc)) from None


def _errors(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"]) or "metadata"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "is required"
            if field == "sessionCount":
                message = "is required (10, 20 or 30); there is no default"
        out.append({"field": field, "message": message})
    return out


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
    """Metadata + the student's local today -> PurchasePlan, or InvalidPurchaseError.

    The first session is on the first day allowed by the schedule mode, not a holiday, on or
    after max(startDate, tomorrow): a missing or past start date moves forward.
    """
    meta = parse_metadata(raw)
    defaults: list[str] = []

    mode = meta.schedule_mode
    if mode is None:
        mode = ScheduleMode.DAILY
        defaults.append("scheduleMode")

    slot = meta.time_slot
    if slot is None:
        slot = TimeSlot(default_time_slot)
        defaults.append("timeSlot")

    duration = meta.session_duration
    if slot.minutes is not None and duration is not None and slot.minutes != duration:
        raise InvalidPurchaseError(
            RejectReason.INVALID_METADATA,
            [
                {
                    "field": "sessionDuration",
                    "message": f"is {duration} minutes but timeSlot spans {slot.minutes} minutes",
                }
            ],
        )
    if duration is None:
        duration = slot.minutes if slot.minutes is not None else default_duration(mode)
        if slot.minutes is None:
            defaults.append("sessionDuration")
    if not 15 <= duration <= 240:
        raise _invalid("timeSlot", f"spans {duration} minutes; expected 15..240")
    try:
        slot_end(slot.start, duration)
    except ScheduleError as exc:
        raise _invalid("timeSlot", str(exc)) from None

    earliest = today + timedelta(days=1)
    latest = latest_start(today)
    if meta.start_date is None:
        defaults.append("startDate")
        requested = earliest
    elif meta.start_date > latest:
        raise _invalid(
            "startDate",
            f"{meta.start_date} is more than a year ahead; the latest start accepted today is "
            f"{latest}",
        )
    else:
        requested = max(meta.start_date, earliest)
    # Holidays on every day for years are not the payment's fault: ScheduleError fails the
    # job at once (held for an operator, replayable), it does not reject the payment.
    start = next_valid_day(requested, mode, holidays)

    return PurchasePlan(
        session_count=meta.session_count,
        start_date=start,
        time_slot=slot.start,
        schedule_mode=mode,
        session_duration=duration,
        upgrade=meta.upgrade,
        defaults_applied=tuple(defaults),
    )


def describe(plan: PurchasePlan) -> dict[str, Any]:
    """JSON-friendly summary (for allocation metadata and logs)."""
    return {
        "sessionCount": plan.session_count,
        "startDate": plan.start_date.isoformat(),
        "timeSlot": plan.time_slot.strftime("%H:%M"),
        "scheduleMode": plan.schedule_mode.value,
        "sessionDuration": plan.session_duration,
    }
