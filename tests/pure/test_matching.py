"""The matching core: pure, no database."""

from __future__ import annotations

import random
import uuid
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from workers.rules.matching import (
    RULE_ORDER,
    CandidateFacts,
    Reason,
    capacity_for,
    decide,
    judge_preference,
    try_order,
)


def facts(**overrides: object) -> CandidateFacts:
    base: dict[str, object] = {
        "trainer_id": uuid.uuid4(),
        "specialty_match": "category",
        "gender_ok": True,
        "distance_km": 2.0,
        "service_radius_km": 10.0,
        "available": True,
        "overlapping_sessions": 0,
        "live_allocations": 0,
        "rating": Decimal("4.5"),
    }
    base.update(overrides)
    return CandidateFacts(**base)  # type: ignore[arg-type]


def test_capacity_table() -> None:
    assert [capacity_for(r) for r in (None, 3.0, 3.1, 3.6, 4.1, 4.59, 4.6, 5)] == [
        4,
        4,
        5,
        6,
        7,
        7,
        8,
        8,
    ]


def test_ranking_order() -> None:
    sub = facts(specialty_match="subcategory", live_allocations=0)
    busy = facts(live_allocations=3)
    low = facts(live_allocations=1, rating=Decimal("3.0"))
    high = facts(live_allocations=1, rating=Decimal("4.9"), distance_km=8)
    near = facts(live_allocations=1, rating=Decimal("4.9"), distance_km=1)
    decision = decide([sub, busy, low, high, near], active_trainers=5, course="X", slot="16:00")
    assert list(decision.ranked) == [near, high, low, busy, sub]


def test_reason_is_the_furthest_rule_reached() -> None:
    far = facts(distance_km=50)
    full = facts(live_allocations=8, rating=Decimal("4.8"))
    decision = decide([far, full], active_trainers=2, course="Robotics", slot="16:00")
    assert decision.chosen is None
    assert decision.reason is Reason.AT_CAPACITY
    assert decision.eliminated == {"out_of_range": 1, "at_capacity": 1}
    assert "Robotics" in decision.sentence


def test_no_candidates_reasons() -> None:
    assert decide([], active_trainers=0, course="X", slot="").reason is Reason.NO_TRAINER
    assert decide([], active_trainers=3, course="X", slot="").reason is Reason.NO_SPECIALTY


candidates = st.builds(
    CandidateFacts,
    trainer_id=st.uuids(),
    specialty_match=st.sampled_from(["category", "subcategory", None]),
    gender_ok=st.booleans(),
    distance_km=st.floats(min_value=0, max_value=40),
    service_radius_km=st.floats(min_value=1, max_value=30),
    available=st.booleans(),
    overlapping_sessions=st.integers(min_value=0, max_value=2),
    live_allocations=st.integers(min_value=0, max_value=9),
    rating=st.none() | st.decimals(min_value=0, max_value=5, places=1),
    far_neighbours=st.integers(min_value=0, max_value=2),
    active=st.booleans(),
)


@given(st.lists(candidates, max_size=12, unique_by=lambda c: c.trainer_id), st.randoms())
def test_decision_properties(pool: list[CandidateFacts], rnd: random.Random) -> None:
    decision = decide(pool, active_trainers=len(pool) + 1, course="X", slot="16:00")
    chosen = decision.chosen
    if chosen is not None:
        # The chosen trainer satisfies every rule, and nobody eligible ranks above it.
        assert chosen.first_failed_rule() is None
        assert chosen.active and chosen.specialty_match is not None
        assert chosen.gender_ok and chosen.available and chosen.overlapping_sessions == 0
        assert chosen.far_neighbours == 0
        assert chosen.distance_km <= chosen.service_radius_km
        assert chosen.measured(chosen.live_allocations) < chosen.capacity
        assert all(chosen.rank_key() <= c.rank_key() for c in decision.ranked)
    else:
        # Nobody chosen: every candidate has a reason, and the pending reason is one of them.
        assert all(c.first_failed_rule() in RULE_ORDER for c in pool)
        assert sum(decision.eliminated.values()) == len(pool)
        assert decision.reason is not None and decision.sentence
    shuffled = list(pool)
    rnd.shuffle(shuffled)
    again = decide(shuffled, active_trainers=len(pool) + 1, course="X", slot="16:00")
    assert again.ranked == decision.ranked
    assert again.reason == decision.reason


def test_the_students_eligible_choice_is_tried_first() -> None:
    best, second, third = facts(distance_km=1), facts(distance_km=2), facts(distance_km=3)
    decision = decide([third, best, second], active_trainers=3, course="X", slot="16:00")
    assert list(decision.ranked) == [best, second, third]
    choice = judge_preference(third.trainer_id, third, course="X", slot="16:00")
    assert choice.eligible
    assert try_order(decision, choice) == [third, best, second]
    assert try_order(decision, None) == [best, second, third]
    assert choice.summary(third.trainer_id) == {
        "trainerId": str(third.trainer_id),
        "chosen": True,
        "outcome": "chosen",
        "reason": None,
    }


def test_a_choice_that_fails_a_rule_says_which_and_is_not_tried_first() -> None:
    other = facts()
    busy = facts(available=False)
    decision = decide([other, busy], active_trainers=2, course="Robotics", slot="16:00")
    choice = judge_preference(busy.trainer_id, busy, course="Robotics", slot="16:00")
    assert (choice.eligible, choice.outcome) == (False, "no_free_slot")
    assert choice.reason == (
        "no_free_slot: the trainer is not available at 16:00 on every weekday of the schedule"
    )
    assert try_order(decision, choice) == [other]
    assert choice.summary(other.trainer_id)["outcome"] == "no_free_slot"
    inactive = judge_preference(uuid.uuid4(), facts(active=False), course="Robotics", slot="16:00")
    assert (inactive.outcome, inactive.reason) == (
        "trainer_inactive",
        "trainer_inactive: the trainer is not active",
    )
    unknown = judge_preference(uuid.uuid4(), None, course="Robotics", slot="16:00")
    assert (unknown.outcome, unknown.reason) == ("unknown_trainer", "no trainer has this id")
    assert unknown.summary(None)["chosen"] is False
