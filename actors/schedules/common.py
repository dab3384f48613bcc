"""What every truncation schedule shares: the interface the actor calls, and fractions as tokens.

A schedule is one file in this package holding its pydantic config variant (`kind: Literal[...]`,
bounded fields with descriptions), a `check(max_new_tokens)` for the rules that depend on the budget
(run at config load, so a bad schedule fails at start-up with its key named) and a `build(max_new_tokens)`
returning a `Schedule`. The union of the variants is `actors.schedules.ScheduleConfig`.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

from protocol.state import LearnerState


class Schedule(Protocol):
    """A built truncation schedule: how many tokens the next rollout prefix may have."""

    def horizon(self, state: LearnerState, rng: random.Random) -> int:
        """Tokens the actor may sample now, in [1, max_new_tokens].

        `state` is the learner's newest published state (its policy version, and measurements a schedule
        may be driven by); `rng` is the actor's seeded stream, which only a random schedule draws from.
        """
        ...


def tokens_of(fraction: float, max_new_tokens: int) -> int:
    """`fraction` of the budget in tokens, rounded half up and kept in [1, max_new_tokens].

    Half up (`floor(x + 0.5)`), not Python's `round` (half to even): 0.25 x 10 is 3 tokens, and
    0.3 x 10 (3.0000000000000004 in floating point) is still 3.
    """
    return max(1, min(max_new_tokens, math.floor(fraction * max_new_tokens + 0.5)))
