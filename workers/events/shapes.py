"""The app's business events (kc-backend shared/events/types.ts), field by field. Pure.

The database builds every event (migration 0017, `kc_event_*`); these models say what a
consumer receives, so that tests check each event against the app's list, and a consumer in
Python can read one (`parse_event`). Every event has the app's base fields (`type`,
`timestamp` in ms since the epoch, `userId`, `role`, optional `metadata`), its type's own
fields, and `eventId`: the same change always has the same id (`event_id`), for
de-duplication by a consumer that may see an event twice (delivery is at least once).

Formats: ids are UUIDs; days are YYYY-MM-DD in the student's time zone; instants are ISO 8601
in UTC as JavaScript writes them (2026-11-23T11:30:00.000Z); time slots as the app writes
them (5:00 PM).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

Day = Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]
Instant = Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")]
Clock = Annotated[str, Field(pattern=r"^(1[0-2]|[1-9]):[0-5]\d (AM|PM)$")]
Role = Literal["student", "trainer", "admin"]
NotificationType = Literal[
    "info", "success", "warning", "error", "session", "payment", "allocation", "system"
]


class BusinessEvent(BaseModel):
    """BaseBusinessEvent, plus eventId. Unknown fields are refused: a consumer relying on
    the app's list sees exactly it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: str
    eventId: UUID
    timestamp: StrictInt
    userId: StrictStr
    role: Role
    metadata: dict[str, Any] | None = None


class PurchaseCreated(BusinessEvent):
    type: Literal["PURCHASE_CREATED"]
    purchaseId: UUID
    studentId: UUID
    courseId: UUID
    purchaseTier: StrictInt
    metadata: dict[str, Any]


class CourseAccessGranted(BusinessEvent):
    type: Literal["COURSE_ACCESS_GRANTED"]
    purchaseId: UUID
    studentId: UUID
    courseId: UUID
    purchaseTier: StrictInt
    metadata: dict[str, Any]


class TrainerAllocated(BusinessEvent):
    type: Literal["TRAINER_ALLOCATED"]
    allocationId: UUID
    trainerId: UUID
    studentId: UUID
    courseId: UUID
    sessionCount: StrictInt
    startDate: Day
    endDate: Day


class SessionsGenerated(BusinessEvent):
    type: Literal["SESSIONS_GENERATED"]
    allocationId: UUID
    trainerId: UUID
    studentId: UUID
    courseId: UUID
    sessionCount: StrictInt
    sessionIds: list[UUID]
    startDate: Day


class StudentDeallocated(BusinessEvent):
    type: Literal["STUDENT_DEALLOCATED"]
    allocationId: UUID
    trainerId: UUID
    studentId: UUID
    courseId: UUID
    reason: StrictStr
    deallocatedAt: Instant


class SessionRescheduled(BusinessEvent):
    type: Literal["SESSION_RESCHEDULED"]
    sessionId: UUID
    oldDate: Day
    newDate: Day
    oldTimeSlot: Clock
    newTimeSlot: Clock
    trainerId: UUID
    studentId: UUID


class SessionSubstituted(BusinessEvent):
    type: Literal["SESSION_SUBSTITUTED"]
    sessionId: UUID
    originalTrainerId: UUID
    substituteTrainerId: UUID
    studentId: UUID
    date: Day
    timeSlot: Clock


class SessionCompleted(BusinessEvent):
    type: Literal["SESSION_COMPLETED"]
    sessionId: UUID
    trainerId: UUID
    studentId: UUID
    courseId: UUID | None = None
    completedAt: Instant
    duration: StrictInt  # minutes


class CourseProgressUpdated(BusinessEvent):
    type: Literal["COURSE_PROGRESS_UPDATED"]
    studentId: UUID
    courseId: UUID
    completedSessions: StrictInt
    totalSessions: StrictInt
    percentage: StrictInt
    lastCompletedAt: Instant


class CourseCompleted(BusinessEvent):
    type: Literal["COURSE_COMPLETED"]
    courseId: UUID
    studentId: UUID
    completionDate: Day
    totalSessions: StrictInt
    completedSessions: StrictInt


class AdminOverride(BusinessEvent):
    type: Literal["ADMIN_OVERRIDE"]
    action: StrictStr
    targetId: StrictStr
    targetType: Literal["allocation", "payroll", "session"]
    changes: dict[str, Any]
    reason: StrictStr


class NotificationRequested(BusinessEvent):
    type: Literal["NOTIFICATION_REQUESTED"]
    notificationType: NotificationType
    title: StrictStr
    body: StrictStr
    deviceToken: StrictStr | None = None
    data: dict[str, Any] | None = None


EVENT_TYPES: dict[str, type[BusinessEvent]] = {
    model.model_fields["type"].annotation.__args__[0]: model  # type: ignore[union-attr]
    for model in (
        PurchaseCreated,
        CourseAccessGranted,
        TrainerAllocated,
        SessionsGenerated,
        StudentDeallocated,
        SessionRescheduled,
        SessionSubstituted,
        SessionCompleted,
        CourseProgressUpdated,
        CourseCompleted,
        AdminOverride,
        NotificationRequested,
    )
}

BASE_FIELDS = ("type", "eventId", "timestamp", "userId", "role", "metadata")


def own_fields(event_type: str) -> tuple[str, ...]:
    """The type's own fields, in the app's order (the base fields left out)."""
    model = EVENT_TYPES[event_type]
    return tuple(name for name in model.model_fields if name not in BASE_FIELDS)


class UnknownEventError(ValueError):
    """An event whose type is not one of the app's."""


def parse_event(text: str | bytes) -> BusinessEvent:
    """One event as published (JSON), checked against its type's fields. UnknownEventError
    for a type not in the list; pydantic's ValidationError names each field that is wrong."""
    import json

    kind = json.loads(text).get("type")
    model = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise UnknownEventError(f"{kind!r} is not a business event type")
    return model.model_validate_json(text)


def event_id(key: str) -> UUID:
    """The id the database gives the event with this key (kc_event_id): a version-8 UUID from
    the SHA-256 of the key (version and variant nibbles 8), so the same change always gets
    the same id."""
    digest = bytearray(hashlib.sha256(f"koding-caravan:{key}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80
    digest[8] = (digest[8] & 0x0F) | 0x80
    return UUID(bytes=bytes(digest))
