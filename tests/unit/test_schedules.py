"""Truncation schedules: every kind, bounds, monotonicity, seeding and parameter validation."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from actors.schedules import (
    FixedSpec,
    FullSpec,
    ProgressiveSpec,
    RandomSpec,
    ScheduleSpec,
    TruncationSchedule,
    spec_from_dict,
)

MAX = 64


def horizons(schedule: TruncationSchedule, versions: range, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [schedule.horizon(v, rng) for v in versions]


def test_full_is_always_max() -> None:
    assert set(horizons(TruncationSchedule(FullSpec(), MAX), range(50))) == {MAX}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (FixedSpec(fraction=0.25), 16),
        (FixedSpec(fraction=1.0), MAX),
        (FixedSpec(fraction=0.001), 1),  # never below one token
        (FixedSpec(tokens=7), 7),
        (FixedSpec(tokens=MAX), MAX),
    ],
)
def test_fixed(spec: FixedSpec, expected: int) -> None:
    assert set(horizons(TruncationSchedule(spec, MAX), range(20))) == {expected}


def test_fixed_fraction_rounds_to_nearest() -> None:
    # 0.3 * 10 is 3.0000000000000004 in floating point: must give 3, not 4.
    assert TruncationSchedule(FixedSpec(fraction=0.3), 10).horizon(0, random.Random(0)) == 3


def test_progressive_linear_ramps_monotonically_from_start_to_max() -> None:
    schedule = TruncationSchedule(ProgressiveSpec(ramp_versions=10, start=4), MAX)
    values = horizons(schedule, range(15))
    assert values[0] == 4
    assert values[10:] == [MAX] * 5
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[5] == 4 + (MAX - 4) // 2


def test_progressive_staged_holds_each_stage_for_an_equal_window() -> None:
    spec = ProgressiveSpec(ramp_versions=9, shape="staged", stages=(8, 16, 32))
    values = horizons(TruncationSchedule(spec, MAX), range(12))
    assert values == [8, 8, 8, 16, 16, 16, 32, 32, 32, MAX, MAX, MAX]


def test_random_stays_in_range_and_is_seeded() -> None:
    schedule = TruncationSchedule(RandomSpec(min_tokens=5, max_tokens=20), MAX)
    first = horizons(schedule, range(500), seed=3)
    assert min(first) == 5 and max(first) == 20  # covers the whole range
    assert first == horizons(schedule, range(500), seed=3)
    assert first != horizons(schedule, range(500), seed=4)


def test_random_defaults_to_full_range() -> None:
    values = horizons(TruncationSchedule(RandomSpec(), 8), range(400))
    assert set(values) == set(range(1, 9))


def test_deterministic_kinds_do_not_consume_the_rng() -> None:
    rng = random.Random(1)
    TruncationSchedule(ProgressiveSpec(ramp_versions=5), MAX).horizon(2, rng)
    assert rng.random() == random.Random(1).random()


@pytest.mark.parametrize(
    "spec",
    [
        FullSpec(),
        FixedSpec(fraction=0.5),
        FixedSpec(tokens=3),
        ProgressiveSpec(ramp_versions=7, start=1),
        ProgressiveSpec(ramp_versions=4, shape="staged", stages=(1, 2, 3, 4)),
        RandomSpec(min_tokens=1),
    ],
)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 33])
def test_horizon_always_within_bounds(spec: ScheduleSpec, max_new_tokens: int) -> None:
    try:
        schedule = TruncationSchedule(spec, max_new_tokens)
    except ValueError:
        return  # e.g. tokens=3 with a budget of 2: rejected up front, never out of range
    for value in horizons(schedule, range(40)):
        assert 1 <= value <= max_new_tokens


@pytest.mark.parametrize(
    ("spec", "max_new_tokens", "field"),
    [
        (FixedSpec(), MAX, "fraction/tokens"),
        (FixedSpec(fraction=0.5, tokens=3), MAX, "fraction/tokens"),
        (FixedSpec(fraction=0.0), MAX, "fraction"),
        (FixedSpec(fraction=1.5), MAX, "fraction"),
        (FixedSpec(tokens=0), MAX, "tokens"),
        (FixedSpec(tokens=MAX + 1), MAX, "tokens"),
        (ProgressiveSpec(ramp_versions=0), MAX, "ramp_versions"),
        (ProgressiveSpec(start=0), MAX, "start"),
        (ProgressiveSpec(start=MAX + 1), MAX, "start"),
        (ProgressiveSpec(shape="staged"), MAX, "stages"),
        (ProgressiveSpec(shape="staged", stages=(8, 4)), MAX, "stages"),
        (ProgressiveSpec(shape="staged", stages=(0, 4)), MAX, "stages[0]"),
        (ProgressiveSpec(shape="staged", stages=(4, MAX + 1)), MAX, "stages[1]"),
        (ProgressiveSpec(ramp_versions=2, shape="staged", stages=(1, 2, 3)), MAX, "stages"),
        (ProgressiveSpec(stages=(4,)), MAX, "stages"),
        (ProgressiveSpec(shape="cubic"), MAX, "shape"),  # type: ignore[arg-type]
        (RandomSpec(min_tokens=0), MAX, "min_tokens"),
        (RandomSpec(min_tokens=10, max_tokens=5), MAX, "max_tokens"),
        (RandomSpec(max_tokens=MAX + 1), MAX, "max_tokens"),
        (FullSpec(), 0, "max_new_tokens"),
    ],
)
def test_bad_params_name_the_field(spec: ScheduleSpec, max_new_tokens: int, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(field)}:"):
        TruncationSchedule(spec, max_new_tokens)


def test_negative_policy_version_is_rejected() -> None:
    with pytest.raises(ValueError, match="policy_version"):
        TruncationSchedule(FullSpec(), MAX).horizon(-1, random.Random(0))


def test_from_dict_builds_each_kind_and_rejects_unknowns() -> None:
    assert (
        TruncationSchedule.from_dict({"kind": "fixed", "fraction": 0.5}, MAX).horizon(0, random.Random())
        == 32
    )
    staged = spec_from_dict({"kind": "progressive", "shape": "staged", "stages": [2, 4], "ramp_versions": 2})
    assert staged == ProgressiveSpec(shape="staged", stages=(2, 4), ramp_versions=2)
    with pytest.raises(ValueError, match=r"^kind:"):
        spec_from_dict({"kind": "sometimes"})
    with pytest.raises(ValueError, match=r"^fration:"):
        spec_from_dict({"kind": "fixed", "fration": 0.5})
