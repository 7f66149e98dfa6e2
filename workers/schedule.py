"""Session schedules. Pure: dates, local times and instants from rules; no I/O, no clock.

- `daily`: every day; `weekdays`: Monday to Friday; `sunday_only`: one session each Sunday.
- Days in `holidays` are skipped (the count stays N: the schedule runs longer).
- `scheduled_date` / `scheduled_time` are wall-clock values in the student's zone; `starts_at`
  is the exact instant. A wall time that does not exist (a DST gap) moves forward by the gap,
  and the stored local time is the real one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from workers.errors import ScheduleError

# A schedule that cannot find its days within this span is refused rather than searched forever.
MAX_SCHEDULE_DAYS = 3 * 366


class ScheduleMode(StrEnum):
    DAILY = "daily"
    WEEKDAYS = "weekdays"
    SUNDAY_ONLY = "sunday_only"


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


def _valid_days(start: date, mode: ScheduleMode, holidays: Collection[date]) -> Iterator[date]:
    weekdays = allowed_weekdays(mode)
    for offset in range(MAX_SCHEDULE_DAYS):
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
) -> list[PlannedSession]:
    """N sessions numbered from `first_number`, on valid days from `start`, at `slot`."""
    sessions = []
    for offset, day in enumerate(session_dates(start, count, mode, holidays)):
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
            )
        )
    return sessions
