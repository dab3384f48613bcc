"""`fixed`: the same horizon for every rollout, as a fraction of `actor.max_new_tokens` or in tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from actors.schedules.common import tokens_of
from protocol.state import LearnerState


class FixedScheduleConfig(BaseModel):
    """`actor.schedule` with a constant horizon (a quarter of the budget unless `fraction` or `tokens` says)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["fixed"] = "fixed"
    fraction: float = Field(0.25, gt=0, le=1, description="Horizon as a fraction of max_new_tokens (rounded half "
                            "up, at least 1 token).")
    tokens: int | None = Field(None, ge=1, description="Absolute horizon in tokens; when set it replaces fraction.")

    def check(self, max_new_tokens: int) -> None:
        if self.tokens is not None and self.tokens > max_new_tokens:
            raise ValueError(f"tokens: {self.tokens} exceeds actor.max_new_tokens ({max_new_tokens})")

    def build(self, max_new_tokens: int) -> FixedSchedule:
        self.check(max_new_tokens)
        return FixedSchedule(self.tokens if self.tokens is not None else tokens_of(self.fraction, max_new_tokens))


@dataclass(frozen=True)
class FixedSchedule:
    tokens: int

    def horizon(self, state: LearnerState, rng: random.Random) -> int:
        return self.tokens
