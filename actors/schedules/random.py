"""`random`: a horizon drawn uniformly per rollout, between two fractions of `actor.max_new_tokens`.

Why: a mix of prefix lengths in every batch, without a curriculum. Draws from the actor's seeded rng,
so a run is reproducible per actor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.schedules.common import tokens_of
from protocol.state import LearnerState


class RandomScheduleConfig(BaseModel):
    """`actor.schedule` with a uniform random horizon."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["random"] = "random"
    min_fraction: float = Field(0.05, gt=0, le=1, description="Lower bound as a fraction of max_new_tokens.")
    max_fraction: float = Field(1.0, gt=0, le=1, description="Upper bound as a fraction of max_new_tokens.")

    @model_validator(mode="after")
    def _ordered(self) -> RandomScheduleConfig:
        if self.min_fraction > self.max_fraction:
            raise ValueError(f"min_fraction: {self.min_fraction} is above max_fraction ({self.max_fraction})")
        return self

    def check(self, max_new_tokens: int) -> None:
        """Both bounds are fractions, so every budget fits."""

    def build(self, max_new_tokens: int) -> RandomSchedule:
        return RandomSchedule(tokens_of(self.min_fraction, max_new_tokens), tokens_of(self.max_fraction, max_new_tokens))


@dataclass(frozen=True)
class RandomSchedule:
    min_tokens: int
    max_tokens: int

    def horizon(self, state: LearnerState, rng: random.Random) -> int:
        return rng.randint(self.min_tokens, self.max_tokens)
