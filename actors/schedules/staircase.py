"""`staircase`: the horizon of progressive OPD (POPD), `H_k = min(T, H0 + dH * floor(k / dk))`.

`T` is `actor.max_new_tokens`, `k` the learner's policy version (`LearnerState.version`), and `H0`, `dH`,
`dk` are `start_tokens`, `step_tokens` and `every_versions`: the horizon starts at H0 tokens and grows by
dH tokens every dk versions until it reaches the budget. In tokens, as the paper states it, where
`progressive` speaks in fractions of the budget.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.state import LearnerState


class StaircaseScheduleConfig(BaseModel):
    """`actor.schedule` growing by a fixed number of tokens every few policy versions."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["staircase"] = "staircase"
    start_tokens: int = Field(16, ge=1, description="H0: the horizon at version 0, in tokens.")
    step_tokens: int = Field(16, ge=0, description="dH: tokens added at every step of the staircase.")
    every_versions: int = Field(10, ge=1, description="dk: policy versions per step of the staircase.")

    def check(self, max_new_tokens: int) -> None:
        if self.start_tokens > max_new_tokens:
            raise ValueError(f"start_tokens: {self.start_tokens} exceeds actor.max_new_tokens ({max_new_tokens})")

    def build(self, max_new_tokens: int) -> StaircaseSchedule:
        self.check(max_new_tokens)
        return StaircaseSchedule(max_new_tokens, self.start_tokens, self.step_tokens, self.every_versions)


@dataclass(frozen=True)
class StaircaseSchedule:
    max_new_tokens: int
    start_tokens: int
    step_tokens: int
    every_versions: int

    def horizon(self, state: LearnerState, rng: random.Random) -> int:
        steps = state.version // self.every_versions
        return min(self.max_new_tokens, self.start_tokens + self.step_tokens * steps)
