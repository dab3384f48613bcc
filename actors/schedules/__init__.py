"""Truncation schedules: how many tokens an actor may sample for one rollout prefix (its horizon).

WHY truncate: on-policy distillation gets a dense per-token signal from the teacher, so a prefix of a
rollout is already a useful training example, and early in training (when the student is far from the
teacher) long rollouts mostly cost compute.

One file per schedule (`full`, `fixed`, `progressive`, `random`, `staircase`, `adaptive`), each with its config
variant and `build()`; `ScheduleConfig` below is what `actor.schedule` holds, a union discriminated by
`kind`. The actor calls `cfg.schedule.build(max_new_tokens)` once and `schedule.horizon(state, rng)` per
prefix, with the learner's `LearnerState`. Adding a schedule is one new file plus one member of
`ScheduleConfig` (docs/architecture.md, "Adding a component").
"""

from __future__ import annotations

from actors.schedules.adaptive import AdaptiveScheduleConfig
from actors.schedules.common import Schedule, tokens_of
from actors.schedules.fixed import FixedScheduleConfig
from actors.schedules.full import FullScheduleConfig
from actors.schedules.progressive import ProgressiveScheduleConfig
from actors.schedules.random import RandomScheduleConfig
from actors.schedules.staircase import StaircaseScheduleConfig
from protocol.components import component_union

ScheduleConfig = component_union(
    FixedScheduleConfig, FullScheduleConfig, ProgressiveScheduleConfig, RandomScheduleConfig, StaircaseScheduleConfig,
    AdaptiveScheduleConfig,
    default=FixedScheduleConfig,
)
"""`actor.schedule`: one variant per schedule, chosen by `kind`; `actor.schedule: full` means that schedule with
its defaults, options without a kind belong to the union's default variant (`fixed`); an actor with no
`actor.schedule` at all runs `full` (`ActorConfig`)."""

__all__ = [
    "AdaptiveScheduleConfig",
    "FixedScheduleConfig",
    "FullScheduleConfig",
    "ProgressiveScheduleConfig",
    "RandomScheduleConfig",
    "Schedule",
    "ScheduleConfig",
    "StaircaseScheduleConfig",
    "tokens_of",
]
