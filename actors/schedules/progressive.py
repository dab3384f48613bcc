"""`progressive`: a horizon that grows with the learner's policy version, up to `actor.max_new_tokens`.

Why: early in training the student is far from the teacher and a short prefix already carries a dense
signal, while long rollouts mostly cost compute; as the student improves, later positions matter.

- `linear`: from `start` (a fraction of the budget) at version 0 to the whole budget at `ramp_versions`;
- `staged`: the ramp is split into len(stages) equal windows; window j uses `stages[j]` (a fraction);
  from `ramp_versions` on, the whole budget.

The version is the learner's (`LearnerState.version`, the newest published weights), which the actor
samples with under admission control.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.schedules.common import tokens_of
from protocol.state import LearnerState

Fraction = Annotated[float, Field(gt=0, le=1)]


class ProgressiveScheduleConfig(BaseModel):
    """`actor.schedule` that grows with the policy version."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["progressive"] = "progressive"
    start: float = Field(0.1, gt=0, le=1, description="linear: starting horizon as a fraction of max_new_tokens.")
    ramp_versions: int = Field(50, ge=1, description="Policy versions to reach the full length.")
    shape: Literal["linear", "staged"] = Field("linear", description="A linear ramp, or discrete stages.")
    stages: list[Fraction] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0],
                                   description="staged: horizons (fractions of max_new_tokens), non-decreasing.")

    @model_validator(mode="after")
    def _stages_fit(self) -> ProgressiveScheduleConfig:
        if self.shape != "staged":
            return self
        if not self.stages:
            raise ValueError("stages: shape 'staged' needs at least one stage")
        if len(self.stages) > self.ramp_versions:
            raise ValueError(f"stages: {len(self.stages)} stages do not fit in ramp_versions={self.ramp_versions}")
        if any(b < a for a, b in zip(self.stages, self.stages[1:], strict=False)):
            raise ValueError(f"stages: must be non-decreasing, got {self.stages}")
        return self

    def check(self, max_new_tokens: int) -> None:
        """Every horizon is a fraction of the budget, so every budget fits."""

    def build(self, max_new_tokens: int) -> ProgressiveSchedule:
        stages = tuple(tokens_of(f, max_new_tokens) for f in self.stages) if self.shape == "staged" else ()
        return ProgressiveSchedule(max_new_tokens, self.ramp_versions, tokens_of(self.start, max_new_tokens), stages)


@dataclass(frozen=True)
class ProgressiveSchedule:
    max_new_tokens: int
    ramp_versions: int
    start_tokens: int
    stages: tuple[int, ...]  # empty: linear

    def horizon(self, state: LearnerState, rng: random.Random) -> int:
        version, top = state.version, self.max_new_tokens
        if version >= self.ramp_versions:
            return top
        if self.stages:
            return self.stages[version * len(self.stages) // self.ramp_versions]
        grown = self.start_tokens + (top - self.start_tokens) * version / self.ramp_versions
        return max(1, min(top, math.floor(grown)))
