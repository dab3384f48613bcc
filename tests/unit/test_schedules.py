"""Truncation schedules (actors/schedules/): every kind, bounds, monotonicity, seeding, validation at load.

Pins:
- each kind's horizons as a function of the learner's `LearnerState` (its policy version), in tokens,
  with fractions of max_new_tokens rounded half up and kept in [1, max_new_tokens];
- only `random` draws from the rng, and it is reproducible from the seed;
- a bad schedule fails when the config is loaded, naming `actor.schedule.<field>`, including the rules
  that depend on `actor.max_new_tokens`;
- a schedule is one file plus one union member: every module of the package (but `common`) defines one
  config variant and the union holds it; `staircase` (POPD's H_k = min(T, H0 + dH * floor(k / dk))) was
  added that way and works from the YAML/override config like the others.
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
import random
import re
import typing
from typing import Any

import pytest

import actors.schedules
from actors.config import ActorConfig
from actors.schedules import ScheduleConfig
from opd.config import ConfigError, load_config
from protocol.state import LearnerState

MAX = 64


def build(schedule: dict[str, Any] | str, max_new_tokens: int = MAX):  # type: ignore[no-untyped-def]
    """The schedule the actor builds from `actor.schedule` (validated as the config loader does)."""
    cfg = ActorConfig.model_validate({"schedule": schedule, "max_new_tokens": max_new_tokens})
    return cfg.schedule.build(max_new_tokens)


def horizons(schedule, versions: range, seed: int = 0) -> list[int]:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    return [schedule.horizon(LearnerState.assumed(v), rng) for v in versions]


def test_full_is_always_max() -> None:
    assert set(horizons(build({"kind": "full"}), range(50))) == {MAX}
    assert set(horizons(build("full"), range(3))) == {MAX}  # a bare kind: that schedule with its defaults


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ({"kind": "fixed", "fraction": 0.25}, 16),
        ({"kind": "fixed", "fraction": 1.0}, MAX),
        ({"kind": "fixed", "fraction": 0.001}, 1),  # never below one token
        ({"kind": "fixed", "tokens": 7}, 7),
        ({"kind": "fixed", "tokens": MAX}, MAX),
        ({}, 16),  # the default schedule: fixed, a quarter of the budget
    ],
)
def test_fixed(schedule: dict[str, Any], expected: int) -> None:
    assert set(horizons(build(schedule), range(20))) == {expected}


def test_fractions_round_half_up() -> None:
    # 0.3 * 10 is 3.0000000000000004 in floating point: 3, not 4; 0.25 * 10 = 2.5 rounds up to 3.
    assert horizons(build({"kind": "fixed", "fraction": 0.3}, 10), range(1)) == [3]
    assert horizons(build({"kind": "fixed", "fraction": 0.25}, 10), range(1)) == [3]


def test_progressive_linear_ramps_monotonically_from_start_to_max() -> None:
    values = horizons(build({"kind": "progressive", "ramp_versions": 10, "start": 4 / MAX}), range(15))
    assert values[0] == 4
    assert values[10:] == [MAX] * 5
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[5] == 4 + (MAX - 4) // 2


def test_progressive_staged_holds_each_stage_for_an_equal_window() -> None:
    schedule = build({"kind": "progressive", "ramp_versions": 9, "shape": "staged", "stages": [0.125, 0.25, 0.5]})
    assert horizons(schedule, range(12)) == [8, 8, 8, 16, 16, 16, 32, 32, 32, MAX, MAX, MAX]


def test_progressive_follows_the_learner_state_it_is_given() -> None:
    schedule = build({"kind": "progressive", "ramp_versions": 4, "shape": "staged", "stages": [0.5, 1.0]}, 10)
    state = LearnerState(version=2, step=7, batch_size=8, max_staleness=1, retired=40)
    assert schedule.horizon(state, random.Random(0)) == 10
    assert schedule.horizon(state.model_copy(update={"version": 1}), random.Random(0)) == 5


def test_random_stays_in_range_and_is_seeded() -> None:
    schedule = build({"kind": "random", "min_fraction": 0.05, "max_fraction": 0.2}, 100)
    first = horizons(schedule, range(500), seed=3)
    assert min(first) == 5 and max(first) == 20  # covers the whole range
    assert first == horizons(schedule, range(500), seed=3)
    assert first != horizons(schedule, range(500), seed=4)


def test_random_defaults_to_the_full_range() -> None:
    assert set(horizons(build({"kind": "random"}, 8), range(400))) == set(range(1, 9))


@pytest.mark.parametrize("kind", ["full", "fixed", "progressive", "staircase", "adaptive"])
def test_deterministic_kinds_do_not_consume_the_rng(kind: str) -> None:
    rng = random.Random(1)
    build({"kind": kind}).horizon(LearnerState.assumed(2), rng)
    assert rng.random() == random.Random(1).random()


def test_staircase_is_the_popd_formula() -> None:
    """H_k = min(T, H0 + dH * floor(k / dk)), from the config as a user writes it (YAML keys, overrides)."""
    cfg = load_config(None, ["actor.max_new_tokens=100", "actor.schedule.kind=staircase",
                             "actor.schedule.start_tokens=20", "actor.schedule.step_tokens=30",
                             "actor.schedule.every_versions=4"])
    schedule = cfg.actor.schedule.build(cfg.actor.max_new_tokens)
    values = horizons(schedule, range(20))
    assert values == [min(100, 20 + 30 * (k // 4)) for k in range(20)]
    assert values[:4] == [20] * 4 and values[4] == 50 and values[-1] == 100


@pytest.mark.parametrize(
    "schedule",
    [
        {"kind": "full"},
        {"kind": "fixed", "fraction": 0.5},
        {"kind": "fixed", "tokens": 1},
        {"kind": "progressive", "ramp_versions": 7, "start": 0.01},
        {"kind": "progressive", "ramp_versions": 4, "shape": "staged", "stages": [0.1, 0.2, 0.3, 1.0]},
        {"kind": "random", "min_fraction": 0.01},
        {"kind": "staircase", "start_tokens": 1, "step_tokens": 5, "every_versions": 2},
        {"kind": "adaptive", "start_tokens": 1, "step_tokens": 5},
    ],
)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 33])
def test_horizon_always_within_bounds(schedule: dict[str, Any], max_new_tokens: int) -> None:
    for value in horizons(build(schedule, max_new_tokens), range(40)):
        assert 1 <= value <= max_new_tokens


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["actor.schedule.kind=sometimes"], "actor.schedule.kind"),
        (["actor.schedule.fration=0.5"], "actor.schedule.fration"),
        (["actor.schedule.fraction=0.0"], "actor.schedule.fraction"),
        (["actor.schedule.fraction=1.5"], "actor.schedule.fraction"),
        (["actor.schedule.tokens=0"], "actor.schedule.tokens"),
        ([f"actor.schedule.tokens={MAX + 1}", f"actor.max_new_tokens={MAX}"], "actor.schedule.tokens"),
        (["actor.schedule.kind=progressive", "actor.schedule.ramp_versions=0"], "actor.schedule.ramp_versions"),
        (["actor.schedule.kind=progressive", "actor.schedule.start=0"], "actor.schedule.start"),
        (["actor.schedule.kind=progressive", "actor.schedule.start=1.5"], "actor.schedule.start"),
        (["actor.schedule.kind=progressive", "actor.schedule.shape=cubic"], "actor.schedule.shape"),
        (["actor.schedule.kind=progressive", "actor.schedule.shape=staged", "actor.schedule.stages=[]"],
         "actor.schedule.stages"),
        (["actor.schedule.kind=progressive", "actor.schedule.shape=staged", "actor.schedule.stages=[0.5, 0.25]"],
         "actor.schedule.stages"),
        (["actor.schedule.kind=progressive", "actor.schedule.stages=[0, 0.5]"], "actor.schedule.stages.0"),
        (["actor.schedule.kind=progressive", "actor.schedule.shape=staged", "actor.schedule.ramp_versions=2",
          "actor.schedule.stages=[0.1, 0.2, 0.3]"], "actor.schedule.stages"),
        (["actor.schedule.kind=random", "actor.schedule.min_fraction=0"], "actor.schedule.min_fraction"),
        (["actor.schedule.kind=random", "actor.schedule.max_fraction=1.5"], "actor.schedule.max_fraction"),
        (["actor.schedule.kind=random", "actor.schedule.min_fraction=0.9", "actor.schedule.max_fraction=0.2"],
         "actor.schedule.min_fraction"),
        (["actor.schedule.kind=staircase", "actor.schedule.start_tokens=65", "actor.max_new_tokens=64"],
         "actor.schedule.start_tokens"),
        (["actor.schedule.kind=staircase", "actor.schedule.every_versions=0"], "actor.schedule.every_versions"),
    ],
)
def test_bad_schedules_fail_at_load_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert re.search(rf"^  {re.escape(key)}:", str(err.value), re.MULTILINE), str(err.value)


def test_a_schedule_is_one_file_and_one_union_member() -> None:
    """Every module of actors/schedules/ (but `common`) defines exactly one config variant, and the union
    holds exactly those: registering a schedule is its file plus its union member, nothing else."""
    union_members = set(typing.get_args(typing.get_args(ScheduleConfig)[0]))
    in_files = set()
    for info in pkgutil.iter_modules(actors.schedules.__path__):
        if info.name == "common":
            continue
        module = importlib.import_module(f"actors.schedules.{info.name}")
        variants = [obj for name, obj in vars(module).items() if name.endswith("ScheduleConfig")
                    and getattr(obj, "__module__", "") == module.__name__]
        assert len(variants) == 1, f"actors/schedules/{info.name}.py defines {variants}"
        assert variants[0].model_fields["kind"].default == info.name
        in_files.add(variants[0])
    assert in_files == union_members
