"""Session schedules. Pure: dates, local times and instants from rules; no I/O, no clock
(callers pass `now`).

- `daily`: every day; `weekdays`: Monday to Friday; `sunday_only`: one session each Sunday.
- Days in `holidays` are skipped (the count stays N: the schedule runs longer).
- `scheduled_date` / `scheduled_time` are wall-clock values in the student's zone; `starts_at`
  is the exact instant. A wall time that does not exist (a DST gap) moves forward by the gap,
  and the stored local time is the real one.
- `hybrid` courses (the old booking service's rule): exactly 30 sessions; 1-6 online, then
  alternating from 7, online first: 18 online and 12 at home. `home` courses: all at home.
  Where a session happens depends on its number only, so it survives reassignments.
- Time zones are IANA names only (`zone_named`): the list shipped with the pinned `tzdata`
  package, so `localtime` (the worker host's zone) or a file path never means anything.
- A purchase's schedule (`plan_sessions`) is planned the same way by the allocation stage
  (to check trainers) and the sessions stage (to write it): never before the student's
  tomorrow, and after every day the purchase's standing sessions already use (`resume_from`).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from workers.errors import InvalidTimezoneError, ScheduleError

# A schedule that cannot find its days within this span is refused rather than searched forever.
MAX_SCHEDULE_DAYS = 3 * 366


class ScheduleMode(StrEnum):
    DAILY = "daily"
    WEEKDAYS = "weekdays"
    SUNDAY_ONLY = "sunday_only"


class LearningMode(StrEnum):
    HOME = "home"
    HYBRID = "hybrid"


class Delivery(StrEnum):
    """Where one session happens (tutoring_sessions.delivery)."""

    HOME = "home"
    ONLINE = "online"


HYBRID_SESSIONS = 30
HYBRID_ONLINE_FIRST = 6  # then alternating, online first


def delivery_for(mode: LearningMode, number: int) -> Delivery:
    """Where session `number` (1-based) of a course happens; kc_session_delivery in SQL."""
    if mode is LearningMode.HOME:
        return Delivery.HOME
    if number <= HYBRID_ONLINE_FIRST or (number - HYBRID_ONLINE_FIRST) % 2 == 1:
        return Delivery.ONLINE
    return Delivery.HOME


_WEEKDAYS: dict[ScheduleMode, frozenset[int]] = {
    ScheduleMode.DAILY: frozenset(range(1, 8)),
    ScheduleMode.WEEKDAYS: frozenset(range(1, 6)),
    ScheduleMode.SUNDAY_ONLY: frozenset({7}),
}


def allowed_weekdays(mode: ScheduleMode) -> frozenset[int]:
    """ISO weekdays (1 = Monday .. 7 = Sunday) on which the mode schedules sessions."""
    return _WEEKDAYS[mode]


def default_duration(mode: ScheduleMode) -> int:
    return 80 if mode is ScheduleMode.SUNDAY_ONLY else 60


@functools.cache
def iana_zone_names() -> frozenset[str]:
    """Every zone name of the IANA database, as listed by the pinned tzdata package."""
    listing = resources.files("tzdata").joinpath("zones").read_text(encoding="utf-8")
    return frozenset(listing.split())


def zone_named(name: str) -> ZoneInfo:
    """The IANA zone called `name`, or InvalidTimezoneError (never an OSError or a host zone).

    Pure apart from reading the zone file; callers in any stage can use it on a row's value.
    """
    if isinstance(name, str) and name in iana_zone_names():
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    raise InvalidTimezoneError(
        f"{str(name)[:80]!r} is not an IANA time zone such as 'Asia/Kolkata'"
    )


def student_zone(name: str) -> ZoneInfo:
    """The zone of a student who has a purchase. A name that is no zone (changed after the
    purchase) fails the job at once: no retry can fix it, and the job waits, held, for the
    row to be corrected."""
    try:
        return zone_named(name)
    except InvalidTimezoneError as exc:
        raise InvalidTimezoneError(
            f"students.timezone {exc}; correct the student's row, then replay the job"
        ) from None


def local_tomorrow(zone_name: str, now: datetime) -> date:
    """The day after `now` (an aware instant) in the student's zone: no session starts
    earlier."""
    return now.astimezone(student_zone(zone_name)).date() + timedelta(days=1)


def resume_from(earliest: date, *taken: date | None) -> date:
    """The first day a schedule that continues may use: `earliest`, and after each day in
    `taken` (the last day of sessions that stand; None: no such sessions)."""
    return max([earliest, *(day + timedelta(days=1) for day in taken if day is not None)])


def slot_end(start: time, minutes: int) -> time | None:
    """When a session starting at `start` ends the same day; None when it ends exactly at
    midnight (PostgreSQL spells that `24:00`); ScheduleError when it would run past midnight."""
    end = start.hour * 60 + start.minute + minutes
    if end > 24 * 60:
        raise ScheduleError(f"a {minutes}-minute session at {start:%H:%M} would end after midnight")
    if end == 24 * 60:
        return None
    return time(end // 60, end % 60)


def _valid_days(start: date, mode: ScheduleMode, holidays: Collection[date]) -> Iterator[date]:
    weekdays = allowed_weekdays(mode)
    # Stop at the calendar's end rather than overflow: the caller then reports too few days.
    for offset in range(min(MAX_SCHEDULE_DAYS, (date.max - start).days + 1)):
        day = start + timedelta(days=offset)
        if day.isoweekday() in weekdays and day not in holidays:
            yield day


def next_valid_day(start: date, mode: ScheduleMode, holidays: Collection[date]) -> date:
    """The first day on or after `start` that the mode allows and that is not a holiday."""
    for day in _valid_days(start, mode, holidays):
        return day
    raise ScheduleError(
        f"no {mode.value} day without a holiday within {MAX_SCHEDULE_DAYS} days of {start}"
    )


def session_dates(
    start: date, count: int, mode: ScheduleMode, holidays: Collection[date]
) -> list[date]:
    """The first `count` valid days on or after `start`."""
    if count < 1:
        raise ScheduleError(f"a schedule needs at least one session, got {count}")
    days: list[date] = []
    for day in _valid_days(start, mode, holidays):
        days.append(day)
        if len(days) == count:
            return days
    raise ScheduleError(
        f"only {len(days)} of {count} {mode.value} sessions fit within "
        f"{MAX_SCHEDULE_DAYS} days of {start} (holidays?)"
    )


@dataclass(frozen=True)
class PlannedSession:
    number: int
    local_date: date
    local_time: time
    starts_at: datetime  # aware, UTC
    ends_at: datetime  # aware, UTC
    duration_minutes: int
    delivery: Delivery = Delivery.HOME


def local_instant(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The instant of a wall-clock time; times in a DST gap move forward by the gap."""
    naive = datetime.combine(day, at)
    # fold=0 reads a gap time with the offset before the transition, which lands after the gap.
    return naive.replace(tzinfo=zone).astimezone(UTC)


def build_schedule(
    *,
    start: date,
    count: int,
    mode: ScheduleMode,
    slot: time,
    duration_minutes: int,
    zone: ZoneInfo,
    holidays: Collection[date],
    first_number: int = 1,
    learning_mode: LearningMode = LearningMode.HOME,
) -> list[PlannedSession]:
    """N sessions numbered from `first_number`, on valid days from `start`, at `slot`; each
    at home or online by its number (`delivery_for`)."""
    sessions = []
    days = session_dates(start, count, mode, holidays)
    try:
        for offset, day in enumerate(days):
            starts_at = local_instant(day, slot, zone)
            local = starts_at.astimezone(zone)
            sessions.append(
                PlannedSession(
                    number=first_number + offset,
                    local_date=local.date(),
                    local_time=local.time().replace(tzinfo=None),
                    starts_at=starts_at,
                    ends_at=starts_at + timedelta(minutes=duration_minutes),
                    duration_minutes=duration_minutes,
                    delivery=delivery_for(learning_mode, first_number + offset),
                )
            )
    except OverflowError:
        # Only near year 9999; a bug or a hand-written row, but a clear error all the same.
        raise ScheduleError(f"sessions from {days[0]} run beyond the calendar's end") from None
    return sessions


def plan_sessions(
    purchase: Mapping[str, Any],
    *,
    earliest: date,
    count: int,
    first_number: int,
    holidays: Collection[date],
) -> list[PlannedSession]:
    """`count` sessions of a purchase, on valid days from `earliest`, numbered from
    `first_number`. `purchase` is any row with the purchase's typed columns
    (`schedule_mode`, `preferred_time_slot`, `session_duration_minutes`, `learning_mode`)
    and the student's `timezone`."""
    mode = ScheduleMode(purchase["schedule_mode"])
    return build_schedule(
        start=next_valid_day(earliest, mode, holidays),
        count=count,
        mode=mode,
        slot=purchase["preferred_time_slot"],
        duration_minutes=purchase["session_duration_minutes"],
        zone=student_zone(purchase["timezone"]),
        holidays=holidays,
        first_number=first_number,
        learning_mode=LearningMode(purchase["learning_mode"]),
    )
