"""Trainer matching: facts about candidates in, a decision and its explanation out. Pure.

The SQL candidate search (sql/queries/allocation.sql) measures the facts; this module
applies the business rules (RULES, defined once: their order, test, explanation and pending
sentence) in that order, so each rejected trainer has exactly one reason (the first rule it
fails), and ranks the eligible ones deterministically.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from enum import StrEnum
from functools import cache
from typing import Any, Literal
from uuid import UUID


class Reason(StrEnum):
    """Why a trainer (or, for a pending allocation, every trainer) was not chosen, or why an
    allocation ended. The matching rules among them are applied in RULE_ORDER (below), not in
    this order. Every value must be allowed by the CHECK constraint on
    trainer_allocations.reason (tests/database/test_schema.py keeps them in step).
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


SpecialtyMatch = Literal["category", "subcategory"]


@cache
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
    # The facts from here on are measured only for trainers who passed every rule before
    # the one that reads them; None means "not measured" (an earlier rule already failed,
    # so no rule reads it).
    available: bool | None  # availability covers the slot on every weekday of the schedule
    overlapping_sessions: int | None
    live_allocations: int | None
    rating: Decimal | None
    far_neighbours: int | None = 0  # sessions in the hour before/after, too far from home
    active: bool = True
    # How many trainers the row stands for: 1, or (trainer_id nil, distance infinite) the
    # group of those based beyond every service radius, counted but not measured one by one.
    trainers: int = 1

    @property
    def capacity(self) -> int:
        return capacity_for(self.rating)

    @classmethod
    def from_rows(
        cls, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> list[CandidateFacts]:
        """Rows of the candidate_facts query, whose columns are these fields in their order
        (checked: a fact added to one and not the other, or moved, raises)."""
        if tuple(columns) != _FACT_NAMES:
            raise ValueError(
                f"candidate_facts returns {list(columns)}, CandidateFacts has "
                f"{list(_FACT_NAMES)}: keep the query's columns in the fields' order"
            )
        return [cls(*row) for row in rows]

    def first_failed_rule(self) -> Reason | None:
        """The first rule in RULE_ORDER this trainer fails (None: eligible). Reads only the
        facts of the rules it reaches, as the search measures them."""
        for rule in RULES:
            if rule.fails(self):
                return rule.reason
        return None

    def failed_rules(self) -> tuple[Reason, ...]:
        """Every rule this trainer fails, in RULE_ORDER (an admin override must see them all,
        not only the first). Needs every fact measured, as the search does for one named
        trainer."""
        return tuple(rule.reason for rule in RULES if rule.fails(self))

    def measured(self, fact: int | None) -> int:
        if fact is None:
            raise ValueError(
                f"trainer {self.trainer_id}: a rule needs a fact that was not "
                "measured; the candidate query and RULE_ORDER disagree"
            )
        return fact

    def rank_key(self) -> tuple[int, int, Decimal, float, str]:
        return (
            0 if self.specialty_match == "category" else 1,
            self.measured(self.live_allocations),
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


_FACT_NAMES = tuple(f.name for f in fields(CandidateFacts))


@dataclass(frozen=True)
class Rule:
    """One matching rule: the reason a trainer who fails it gets, the test, why one trainer
    fails it (with the facts), and what a pending allocation says when nobody got past it."""

    reason: Reason
    fails: Callable[[CandidateFacts], bool]
    why: Callable[[CandidateFacts, str, str], str]  # (trainer, course, slot) -> clause
    pending: str  # formatted with n (candidates), course and slot


# The matching rules in the order they are applied: a trainer is out at the first one they
# fail. The candidate search (candidate_facts in sql/queries/allocation.sql) measures the
# costly facts (overlapping sessions, far neighbours) only for trainers who pass every rule
# before the one that reads them; tests/database/test_allocation_rule_order.py fails when
# the two disagree.
RULES: tuple[Rule, ...] = (
    Rule(
        Reason.TRAINER_INACTIVE,
        fails=lambda t: not t.active,
        why=lambda t, course, slot: "the trainer is not active",
        pending="The requested trainer is not active.",
    ),
    Rule(
        Reason.NO_SPECIALTY,
        fails=lambda t: t.specialty_match is None,
        why=lambda t, course, slot: f"the trainer does not teach {course}",
        pending="No active trainer teaches {course}.",
    ),
    Rule(
        Reason.GENDER_MISMATCH,
        fails=lambda t: not t.gender_ok,
        why=lambda t, course, slot: "the trainer's gender does not match the student's preference",
        pending="{n} trainer(s) teach {course}, but none matches the student's gender preference.",
    ),
    Rule(
        Reason.OUT_OF_RANGE,
        fails=lambda t: t.distance_km > t.service_radius_km,
        why=lambda t, course, slot: (
            f"the student's home is {t.distance_km:.1f} km from the trainer's base, "
            f"beyond the {t.service_radius_km:g} km service radius"
        ),
        pending="{n} trainer(s) teach {course}, but the student's home is outside the service "
        "radius of every one that qualified so far.",
    ),
    # Capacity before the time rules: it is one indexed count, while overlaps and sequential
    # distance scan the trainer's sessions.
    Rule(
        Reason.AT_CAPACITY,
        fails=lambda t: t.measured(t.live_allocations) >= t.capacity,
        why=lambda t, course, slot: (
            f"the trainer holds {t.live_allocations} of {t.capacity} live allocations"
        ),
        pending="{n} trainer(s) teach {course} in the area, but all are at capacity.",
    ),
    Rule(
        Reason.NO_FREE_SLOT,
        fails=lambda t: not t.measured(t.available) or t.measured(t.overlapping_sessions) > 0,
        why=lambda t, course, slot: (
            f"the trainer is not available at {slot} on every weekday of the schedule"
            if not t.available
            else f"{t.overlapping_sessions} of the trainer's sessions overlap the new ones"
        ),
        pending="{n} trainer(s) teach {course} and cover the area, but none is free on every "
        "session day at {slot}.",
    ),
    Rule(
        Reason.TOO_FAR_BETWEEN_SESSIONS,
        fails=lambda t: t.measured(t.far_neighbours) > 0,
        why=lambda t, course, slot: (
            f"{t.far_neighbours} of the trainer's sessions in the hour before or after are at "
            "a home too far from this student's"
        ),
        pending="{n} trainer(s) are free at {slot}, but each has a session in the hour before "
        "or after at another student's home too far from this one.",
    ),
)
RULE_ORDER: tuple[Reason, ...] = tuple(rule.reason for rule in RULES)
_RULES: dict[Reason, Rule] = {rule.reason: rule for rule in RULES}
_SENTENCES: dict[Reason, str] = {Reason.NO_TRAINER: "There is no active trainer at all."} | {
    rule.reason: rule.pending for rule in RULES
}


@dataclass(frozen=True)
class RankedSearch:
    """How a rank-first search went (None on a Decision: every candidate was measured)."""

    ranked: int  # trainers within reach who pass the cheap rules: the ranking's length
    places: dict[UUID, int]  # each measured trainer's place in the ranking (1 = best)
    batches: int  # queries that measured the costly rules
    exhaustive: bool  # every ranked trainer was measured (so eliminated counts are complete)

    def above(self, chosen: CandidateFacts, measured: Sequence[CandidateFacts]) -> dict[str, Any]:
        """The winner's place, and the rule each trainer ranked above it failed (an eligible
        one above it was taken or held by another purchase when tried)."""
        place = self.places[chosen.trainer_id]
        ahead = sorted(
            (
                c
                for c in measured
                if c.trainers == 1 and self.places.get(c.trainer_id, place) < place
            ),
            key=lambda c: self.places[c.trainer_id],
        )
        rules = [c.first_failed_rule() for c in ahead]
        failed = Counter("taken" if rule is None else rule.value for rule in rules)
        return {
            "method": "ranked",
            "place": place,
            "ranked": self.ranked,
            "measured": len(self.places),
            "batches": self.batches,
            "above": len(ahead),
            "aboveFailed": dict(sorted(failed.items())),
            "aboveTrainers": [
                {
                    "trainerId": str(c.trainer_id),
                    "place": self.places[c.trainer_id],
                    "failed": "taken" if rule is None else rule.value,
                }
                for c, rule in list(zip(ahead, rules, strict=True))[:10]
            ],
        }


@dataclass(frozen=True)
class Decision:
    """The ranked eligible trainers (best first) or, when there are none, why."""

    ranked: tuple[CandidateFacts, ...]
    reason: Reason | None
    sentence: str
    eliminated: dict[str, int] = field(default_factory=dict)
    candidates: tuple[CandidateFacts, ...] = ()
    # Set when the decision came from the rank-first search (only part of the ranking
    # measured, unless `exhaustive`); None: the full search measured everyone within reach.
    search: RankedSearch | None = None

    @property
    def chosen(self) -> CandidateFacts | None:
        return self.ranked[0] if self.ranked else None

    @property
    def partial(self) -> bool:
        """Only the top of the ranking was measured: more eligible trainers may exist."""
        return self.search is not None and not self.search.exhaustive

    def explain(self, chosen: CandidateFacts | None = None) -> dict[str, Any]:
        chosen = chosen if chosen is not None else self.chosen
        out: dict[str, Any] = {
            "rules": [r.value for r in RULE_ORDER],
            "eligible": len(self.ranked),
            "eliminated": self.eliminated,
            "ranking": [c.summary() | {"rank": i + 1} for i, c in enumerate(self.ranked[:5])],
        }
        if chosen is not None:
            # A trainer held when tried may come from an earlier (partial) decision.
            rank = next(
                (i + 1 for i, c in enumerate(self.ranked) if c.trainer_id == chosen.trainer_id),
                None,
            )
            out["chosen"] = chosen.summary() | {"rank": rank}
            if self.search is not None and chosen.trainer_id in self.search.places:
                out["found"] = self.search.above(chosen, self.candidates)
            else:
                out["found"] = {"method": "everyone", "measured": len(self.candidates)}
        else:
            out["reason"] = self.reason.value if self.reason else None
            out["sentence"] = self.sentence
            if self.search is not None:
                out["found"] = {
                    "method": "ranked",
                    "ranked": self.search.ranked,
                    "measured": len(self.search.places),
                    "batches": self.search.batches,
                }
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
            eliminated[failed] += candidate.trainers
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
    n = sum(candidate.trainers for candidate in candidates)
    sentence = sentence_for(reason, n=n, course=course, slot=slot)
    return Decision((), reason, sentence, eliminated_json, tuple(candidates))


def explain_rule(reason: Reason, trainer: CandidateFacts, *, course: str, slot: str) -> str:
    """Why one trainer fails one rule, with the facts: '<code>: <clause>'."""
    return f"{reason.value}: {_RULES[reason].why(trainer, course, slot)}"


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
