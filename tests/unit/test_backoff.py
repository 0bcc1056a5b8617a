"""The one backoff formula: full jitter under a doubling ceiling, capped, pure."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.backoff import full_jitter_delay


def test_the_ceiling_doubles_from_base_to_the_cap() -> None:
    ceilings = [full_jitter_delay(n, base=0.5, cap=6.0, rand=1.0) for n in range(1, 7)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]


def test_no_failure_yet_counts_as_the_first() -> None:
    for attempt in (0, -3):
        assert full_jitter_delay(attempt, base=0.5, cap=6.0, rand=1.0) == 0.5


def test_the_draw_scales_the_ceiling() -> None:
    assert full_jitter_delay(3, base=1.0, cap=60.0, rand=0.25) == 1.0
    assert full_jitter_delay(3, base=1.0, cap=60.0, rand=0.0) == 0.0


def test_a_huge_attempt_count_stays_at_the_cap() -> None:
    assert full_jitter_delay(10_000, base=1.0, cap=300.0, rand=0.5) == 150.0


@given(
    st.integers(min_value=1, max_value=100),
    st.floats(min_value=1e-3, max_value=10.0),
    st.floats(min_value=10.0, max_value=3600.0),
    st.integers(min_value=0, max_value=2**32),
)
def test_same_waits_as_a_uniform_draw_from_one_seed(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    # Callers moved from rng.uniform(0, ceiling) to rand=rng.random(): a seed keeps its waits.
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    expected = random.Random(seed).uniform(0.0, ceiling)
    got = full_jitter_delay(attempt, base=base, cap=cap, rand=random.Random(seed).random())
    assert got == expected
    assert 0.0 <= got <= ceiling


@pytest.mark.parametrize("rand", [0.0, 0.999999])
def test_never_above_the_cap(rand: float) -> None:
    assert full_jitter_delay(40, base=2.0, cap=30.0, rand=rand) < 30.0
