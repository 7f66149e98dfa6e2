"""Trainer matching: facts about candidates in, a decision and its explanation out. Pure.

The SQL candidate search (sql/queries/allocation.sql) measures every fact; this module
applies the business rules in a fixed order, so each rejected trainer has exactly one reason
(the first rule it fails), and ranks the eligible ones deterministically.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID


class Reason(StrEnum):
    """Why a trainer (or, for a pending allocation, every trainer) was not chosen.

    The order is the order in which rules are applied; it must match the CHECK constraint on
    trainer_allocations.reason (a test keeps them in step).
    """

    NO_TRAINER = "no_trainer"
    NO_SPECIALTY = "no_specialty"
    GENDER_MISMATCH = "gender_mismatch"
    OUT_OF_RANGE = "out_of_range"
    NO_FREE_SLOT = "no_free_slot"
    TOO_FAR_BETWEEN_SESSIONS = "too_far_between_sessions"
    AT_CAPACITY = "at_capacity"
    TRAINER_INACTIVE = "trainer_inactive"
    REFUNDED = "refunded"
    REASSIGNED = "reassigned"
    TRAINER_LEFT = "trainer_left"  # the trainer can no longer teach a live allocation
    RESCHEDULED = "rescheduled"  # the student asked for another slot, date or mode


# The rules a candidate can fail, in the order they are checked.
RULE_ORDER: tuple[Reason, ...] = (
    Reason.TRAINER_INACTIVE,
    Reason.NO_SPECIALTY,
    Reason.GENDER_MISMATCH,
    Reason.OUT_OF_RANGE,
    # Capacity before the time rules: it is one indexed count, while overlaps and sequential
    # distance scan the trainer's sessions; the search measures those only for trainers who
    # passed every rule before them.
    Reason.AT_CAPACITY,
    Reason.NO_FREE_SLOT,
    Reason.TOO_FAR_BETWEEN_SESSIONS,
)

_SENTENCES: dict[Reason, str] = {
    Reason.NO_TRAINER: "There is no active trainer at all.",
    Reason.NO_SPECIALTY: "No active trainer teaches {course}.",
    Reason.GENDER_MISMATCH: "{n} trainer(s) teach {course}, but none matches the student's "
    "gender preference.",
    Reason.OUT_OF_RANGE: "{n} trainer(s) teach {course}, but the student's home is outside "
    "the service radius of every one that qualified so far.",
    Reason.NO_FREE_SLOT: "{n} trainer(s) teach {course} and cover the area, but none is free "
    "on every session day at {slot}.",
    Reason.TOO_FAR_BETWEEN_SESSIONS: "{n} trainer(s) are free at {slot}, but each has a "
    "session in the hour before or after at another student's home too far from this one.",
    Reason.AT_CAPACITY: "{n} trainer(s) teach {course} in the area, but all are at capacity.",
    Reason.TRAINER_INACTIVE: "The requested trainer is not active.",
}

SpecialtyMatch = Literal["category", "subcategory"]


def capacity_for(rating: Decimal | float | None) -> int:
    """Live allocations a trainer may hold, by rating (same table as kc_trainer_capacity)."""
    if rating is None:
        return 4
    value = Decimal(str(rating))
    for threshold, capacity in (
        (Decimal("4.6"), 8),
        (Decimal("4.1"), 7),
        (Decimal("3.6"), 6),
        (Decimal("3.1"), 5),
    ):
        if value >= threshold:
            return capacity
    return 4


@dataclass(frozen=True)
class CandidateFacts:
    """What the database measured about one active trainer who teaches the course."""

    trainer_id: UUID
    specialty_match: SpecialtyMatch | None
    gender_ok: bool
    distance_km: float
    service_radius_km: float
    available: bool  # availability covers the slot on every weekday of the schedule
    # The costly facts are measured only for trainers who passed every earlier rule; None
    # means "not measured" (an earlier rule already failed, so no rule reads it).
    overlapping_sessions: int | None
    live_allocations: int
    rating: Decimal | None
    far_neighbours: int | None = 0  # sessions in the hour before/after, too far from home
    active: bool = True

    @property
    def capacity(self) -> int:
        return capacity_for(self.rating)

    def first_failed_rule(self) -> Reason | None:
        if not self.active:
            return Reason.TRAINER_INACTIVE
        if self.specialty_match is None:
            return Reason.NO_SPECIALTY
        if not self.gender_ok:
            return Reason.GENDER_MISMATCH
        if self.distance_km > self.service_radius_km:
            return Reason.OUT_OF_RANGE
        if self.live_allocations >= self.capacity:
            return Reason.AT_CAPACITY
        if not self.available or self._measured(self.overlapping_sessions) > 0:
            return Reason.NO_FREE_SLOT
        if self._measured(self.far_neighbours) > 0:
            return Reason.TOO_FAR_BETWEEN_SESSIONS
        return None

    def failed_rules(self) -> tuple[Reason, ...]:
        """Every rule this trainer fails, in RULE_ORDER (an admin override must see them all,
        not only the first). Needs every fact measured, as the search does for one named
        trainer."""
        failed = {
            Reason.TRAINER_INACTIVE: not self.active,
            Reason.NO_SPECIALTY: self.specialty_match is None,
            Reason.GENDER_MISMATCH: not self.gender_ok,
            Reason.OUT_OF_RANGE: self.distance_km > self.service_radius_km,
            Reason.AT_CAPACITY: self.live_allocations >= self.capacity,
            Reason.NO_FREE_SLOT: not self.available
            or self._measured(self.overlapping_sessions) > 0,
            Reason.TOO_FAR_BETWEEN_SESSIONS: self._measured(self.far_neighbours) > 0,
        }
        return tuple(rule for rule in RULE_ORDER if failed[rule])

    def _measured(self, fact: int | None) -> int:
        if fact is None:
            raise ValueError(
                f"trainer {self.trainer_id}: a rule needs a fact that was not "
                "measured; the candidate query and RULE_ORDER disagree"
            )
        return fact

    def rank_key(self) -> tuple[int, int, Decimal, float, str]:
        return (
            0 if self.specialty_match == "category" else 1,
            self.live_allocations,
            -(self.rating if self.rating is not None else Decimal(0)),
            self.distance_km,
            str(self.trainer_id),
        )

    def summary(self) -> dict[str, Any]:
        return {
            "trainerId": str(self.trainer_id),
            "specialtyMatch": self.specialty_match,
            "distanceKm": round(self.distance_km, 3),
            "serviceRadiusKm": self.service_radius_km,
            "liveAllocations": self.live_allocations,
            "farNeighbours": self.far_neighbours,
            "capacity": self.capacity,
            "rating": None if self.rating is None else float(self.rating),
        }


@dataclass(frozen=True)
class Decision:
    """The ranked eligible trainers (best first) or, when there are none, why."""

    ranked: tuple[CandidateFacts, ...]
    reason: Reason | None
    sentence: str
    eliminated: dict[str, int] = field(default_factory=dict)
    candidates: tuple[CandidateFacts, ...] = ()

    @property
    def chosen(self) -> CandidateFacts | None:
        return self.ranked[0] if self.ranked else None

    def explain(self, chosen: CandidateFacts | None = None) -> dict[str, Any]:
        chosen = chosen if chosen is not None else self.chosen
        out: dict[str, Any] = {
            "rules": [r.value for r in RULE_ORDER],
            "eligible": len(self.ranked),
            "eliminated": self.eliminated,
            "ranking": [c.summary() | {"rank": i + 1} for i, c in enumerate(self.ranked[:5])],
        }
        if chosen is not None:
            out["chosen"] = chosen.summary() | {"rank": self.ranked.index(chosen) + 1}
        else:
            out["reason"] = self.reason.value if self.reason else None
            out["sentence"] = self.sentence
        return out


def decide(
    candidates: Sequence[CandidateFacts], *, active_trainers: int, course: str, slot: str
) -> Decision:
    """Apply every rule to every candidate; rank the eligible ones.

    With nobody eligible, the reason is the furthest rule any candidate reached: if some
    trainers were only at capacity, the purchase waits for capacity, not for a specialty.
    """
    eliminated: Counter[Reason] = Counter()
    eligible: list[CandidateFacts] = []
    for candidate in candidates:
        failed = candidate.first_failed_rule()
        if failed is None:
            eligible.append(candidate)
        else:
            eliminated[failed] += 1
    eliminated_json = {
        reason.value: eliminated[reason] for reason in RULE_ORDER if eliminated[reason]
    }
    if eligible:
        ranked = tuple(sorted(eligible, key=CandidateFacts.rank_key))
        return Decision(ranked, None, "", eliminated_json, tuple(candidates))

    if active_trainers == 0:
        reason = Reason.NO_TRAINER
    elif not candidates:
        reason = Reason.NO_SPECIALTY
    else:
        reason = furthest(list(eliminated))
    sentence = sentence_for(reason, n=len(candidates), course=course, slot=slot)
    return Decision((), reason, sentence, eliminated_json, tuple(candidates))


def explain_rule(reason: Reason, trainer: CandidateFacts, *, course: str, slot: str) -> str:
    """Why one trainer fails one rule, with the facts: '<code>: <sentence>'."""
    if reason is Reason.TRAINER_INACTIVE:
        why = "the trainer is not active"
    elif reason is Reason.NO_SPECIALTY:
        why = f"the trainer does not teach {course}"
    elif reason is Reason.GENDER_MISMATCH:
        why = "the trainer's gender does not match the student's preference"
    elif reason is Reason.OUT_OF_RANGE:
        why = (
            f"the student's home is {trainer.distance_km:.1f} km from the trainer's base, "
            f"beyond the {trainer.service_radius_km:g} km service radius"
        )
    elif reason is Reason.AT_CAPACITY:
        why = f"the trainer holds {trainer.live_allocations} of {trainer.capacity} live allocations"
    elif reason is Reason.NO_FREE_SLOT:
        why = (
            f"the trainer is not available at {slot} on every weekday of the schedule"
            if not trainer.available
            else f"{trainer.overlapping_sessions} of the trainer's sessions overlap the new ones"
        )
    elif reason is Reason.TOO_FAR_BETWEEN_SESSIONS:
        why = (
            f"{trainer.far_neighbours} of the trainer's sessions in the hour before or after "
            "are at a home too far from this student's"
        )
    else:
        why = _SENTENCES[reason].format(n=1, course=course, slot=slot)
    return f"{reason.value}: {why}"


def sentence_for(reason: Reason, *, n: int, course: str, slot: str) -> str:
    return _SENTENCES[reason].format(n=n, course=course, slot=slot)


def furthest(reasons: list[Reason]) -> Reason:
    """The rule reached by the candidate that got furthest (see `decide`)."""
    return max(reasons, key=RULE_ORDER.index)


@dataclass(frozen=True)
class Preference:
    """The trainer the student picked in the app, and whether they can take the purchase.

    `outcome` is 'eligible' (tried first), a rule's code (the first they fail), or
    'unknown_trainer' (no trainer has this id): never an error, always recorded.
    """

    trainer_id: UUID
    outcome: str
    reason: str | None = None

    @property
    def eligible(self) -> bool:
        return self.outcome == "eligible"

    def summary(self, chosen: UUID | None) -> dict[str, Any]:
        taken = chosen == self.trainer_id
        return {
            "trainerId": str(self.trainer_id),
            "chosen": taken,
            "outcome": "chosen" if taken else self.outcome,
            "reason": None if taken else self.reason,
        }


def judge_preference(
    trainer_id: UUID, facts: CandidateFacts | None, *, course: str, slot: str
) -> Preference:
    """Whether the student's chosen trainer passes every rule; if not, the first rule they
    fail, with the facts."""
    if facts is None:
        return Preference(trainer_id, "unknown_trainer", "no trainer has this id")
    failed = facts.first_failed_rule()
    if failed is None:
        return Preference(trainer_id, "eligible")
    return Preference(
        trainer_id, failed.value, explain_rule(failed, facts, course=course, slot=slot)
    )


def try_order(decision: Decision, preference: Preference | None) -> list[CandidateFacts]:
    """The ranked trainers in the order to try them: the student's choice first when they
    are eligible, then the ranking."""
    ranked = list(decision.ranked)
    if preference is None or not preference.eligible:
        return ranked
    return sorted(ranked, key=lambda c: c.trainer_id != preference.trainer_id)
