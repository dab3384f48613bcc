"""`full`: never truncate; every rollout may use all of `actor.max_new_tokens` (the untruncated baseline)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from protocol.state import LearnerState


class FullScheduleConfig(BaseModel):
    """`actor.schedule` that never truncates."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["full"] = "full"

    def check(self, max_new_tokens: int) -> None:
        """Nothing depends on the budget: the horizon is the budget."""

    def build(self, max_new_tokens: int) -> FullSchedule:
        return FullSchedule(max_new_tokens)


@dataclass(frozen=True)
class FullSchedule:
    max_new_tokens: int

    def horizon(self, state: LearnerState, rng: random.Random) -> int:
        return self.max_new_tokens
