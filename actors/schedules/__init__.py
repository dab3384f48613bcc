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

from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field

from actors.schedules.adaptive import AdaptiveScheduleConfig
from actors.schedules.common import Schedule, tokens_of
from actors.schedules.fixed import FixedScheduleConfig
from actors.schedules.full import FullScheduleConfig
from actors.schedules.progressive import ProgressiveScheduleConfig
from actors.schedules.random import RandomScheduleConfig
from actors.schedules.staircase import StaircaseScheduleConfig


def _kind_shorthand(value: Any) -> Any:
    """`actor.schedule: full` means that schedule with its defaults; options without a kind belong to the
    default schedule (`fixed`)."""
    if isinstance(value, str):
        return {"kind": value}
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": FixedScheduleConfig.model_fields["kind"].default, **value}
    return value


ScheduleConfig = Annotated[
    Union[  # noqa: UP007 (a discriminated union, built at runtime)
        FixedScheduleConfig, FullScheduleConfig, ProgressiveScheduleConfig, RandomScheduleConfig, StaircaseScheduleConfig,
        AdaptiveScheduleConfig,
    ],
    Field(discriminator="kind"),
    BeforeValidator(_kind_shorthand),
]
"""`actor.schedule`: one variant per schedule, chosen by `kind`."""

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
