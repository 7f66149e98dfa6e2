"""The rules of time passing that are pure logic, and the SQL clock parser's examples."""

from __future__ import annotations

import re
from decimal import Decimal
from uuid import UUID

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.rows import DictRow

from workers.rules.matching import CandidateFacts, Decision
from workers.rules.metadata import parse_clock
from workers.stages.lifecycle import prefer

Conn = psycopg.Connection[DictRow]

candidate = st.builds(
    CandidateFacts,
    trainer_id=st.uuids(),
    specialty_match=st.sampled_from(["category", "subcategory"]),
    gender_ok=st.just(True),
    distance_km=st.floats(0, 20),
    service_radius_km=st.just(20.0),
    available=st.just(True),
    overlapping_sessions=st.just(0),
    live_allocations=st.integers(0, 3),
    rating=st.none() | st.decimals(Decimal("0"), Decimal("5"), places=1),
)


@given(st.lists(candidate, max_size=6, unique_by=lambda c: c.trainer_id), st.data())
def test_prefer_puts_the_trainer_first_and_keeps_the_rest_in_order(
    ranked: list[CandidateFacts], data: st.DataObject
) -> None:
    decision = Decision(tuple(ranked), None, "")
    ids = [c.trainer_id for c in ranked]
    pick_ranked = bool(ids) and data.draw(st.booleans())
    trainer: UUID = data.draw(st.sampled_from(ids) if pick_ranked else st.uuids())
    preferred = prefer(decision, trainer)
    if trainer not in ids:
        assert preferred == decision
        return
    assert preferred.ranked[0].trainer_id == trainer
    assert list(preferred.ranked[1:]) == [c for c in ranked if c.trainer_id != trainer]
    assert preferred.chosen is not None and preferred.chosen.trainer_id == trainer
    assert (preferred.reason, preferred.sentence) == (decision.reason, decision.sentence)


# The agreement of each Python rule with its SQL half (schedule mode weekdays, clock times):
# tests/database/test_rule_pairs.py. These are the SQL half's own examples and messages.
def python_clock(text: str) -> str:
    try:
        return parse_clock(text).isoformat()
    except ValueError:
        return "refused"


def sql_clock(conn: Conn, text: str) -> str:
    try:
        with conn.transaction():
            row = conn.execute("SELECT kc_parse_clock(%s)::text AS t", (text,)).fetchone()
    except psycopg.errors.InvalidDatetimeFormat:
        return "refused"
    assert row is not None
    return str(row["t"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4:00 PM", "16:00:00"), ("4 PM", "16:00:00"), ("12 am", "00:00:00"), ("16:00", "16:00:00")],
)
def test_sql_clock_examples(conn: Conn, text: str, expected: str) -> None:
    assert sql_clock(conn, text) == expected
    assert python_clock(text) == expected


def test_sql_clock_refuses_with_the_reason(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidDatetimeFormat, match=re.escape("'13 PM'")):
        conn.execute("SELECT kc_parse_clock('13 PM')")
