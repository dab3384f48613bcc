"""`adaptive`: a horizon that grows when the student's reverse KL on it has settled, driven by the learner.

The learner measures, per window of `learner.kl_window_steps` steps, the sampled reverse KL
`log mu(y) - log p_T(y)` per bucket of response positions, of the tokens it trained on and of the probes'
tokens (full-length rollouts it never trains on), and publishes the recent windows in
`LearnerState.kl_windows` (learner/position_kl.py). From those windows alone:

1. The current horizon `H` is the largest horizon the learner has trained on (a window's `horizon_max`),
   at least `start_tokens`.
2. The KL on `H` has *settled* when, over `window` consecutive windows trained entirely at `H`
   (`horizon_min == horizon_max == H`), the token-weighted KL of the second half of them improved on the
   first half by less than `settle_threshold` (relative): a window-based change detector. Windows with a
   mix of horizons (samples still in flight from before a growth) do not count, so the KL of a bucket that
   was just added is judged only once it is trained.
3. The probes' KL past `H` (buckets starting at or after `H`), pooled over the same windows, tells whether
   the extra tokens carry signal: if the probes hold at least `min_probe_tokens` tokens there and their KL
   is below `late_kl_ratio` times their KL within `H`, the student already matches the teacher there and the
   horizon holds. Without such evidence (no probes, or answers ending before `H`) settling alone decides.
4. Settled and not vetoed: the horizon is `H + step_tokens`; otherwise `H`. Always within
   [`start_tokens`, `max_tokens` or `actor.max_new_tokens`].

Why the actors decide, from the published state: the decision is a pure function of `LearnerState`, so every
actor handed the same state picks the same horizon (several actors agree without talking to each other),
and the learner stays schedule-agnostic (it measures; it does not need this file's options). The windows
are immutable once published, and a qualifying run of windows stays in the state's history until the grown
horizon has reached the learner (opd/config.py checks `learner.kl_history` is long enough for that), so the
decision does not flicker back while samples at the old horizon are still in flight.

Why monotone (never shrinks): the detector cannot tell a KL that rose because later positions started to
train from noise or a task that got harder, and shrinking would stop training the late positions the
student has begun to learn, reintroducing the rollouts that end without their answers; POPD's staircase and
the adaptive schedules reported after it only grow. Monotone also makes "the current horizon" well defined
(the largest one trained) while old and new horizons are both in flight.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.state import KLWindow, LearnerState


class AdaptiveScheduleConfig(BaseModel):
    """`actor.schedule` grown by the learner's measurements (reverse KL by position, probes past the horizon)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["adaptive"] = "adaptive"
    start_tokens: int = Field(16, ge=1, description="The horizon before any measurement, and its lower bound.")
    step_tokens: int = Field(16, ge=1, description="Tokens added each time the KL on the horizon has settled.")
    max_tokens: int | None = Field(None, ge=1, description="Upper bound on the horizon (None: actor.max_new_tokens).")
    window: int = Field(4, ge=2, description="Consecutive learner KL windows at the current horizon the detector "
                        "compares (first half against second half).")
    settle_threshold: float = Field(0.05, gt=0, lt=1, description="Settled when the KL improved by less than this "
                                    "fraction between the two halves of the window.")
    late_kl_ratio: float = Field(0.25, ge=0, description="The probes' KL past the horizon must be at least this times "
                                 "their KL within it for the horizon to grow (0: never veto).")
    min_probe_tokens: int = Field(64, ge=1, description="Probe tokens past the horizon needed before they may veto.")

    def check(self, max_new_tokens: int) -> None:
        if self.start_tokens > max_new_tokens:
            raise ValueError(f"start_tokens: {self.start_tokens} exceeds actor.max_new_tokens ({max_new_tokens})")
        if self.max_tokens is not None and self.max_tokens > max_new_tokens:
            raise ValueError(f"max_tokens: {self.max_tokens} exceeds actor.max_new_tokens ({max_new_tokens})")
        if self.max_tokens is not None and self.max_tokens < self.start_tokens:
            raise ValueError(f"max_tokens: {self.max_tokens} is below start_tokens ({self.start_tokens})")

    def learner_windows_needed(self, *, max_staleness: int, window_steps: int) -> int:
        """KL windows the learner must keep (`learner.kl_history`) so a qualifying run stays published until
        samples at the grown horizon arrive: the run, the windows of at most `max_staleness + 1` steps of samples
        admitted before the growth, and one mixed window."""
        return self.window + math.ceil((max_staleness + 1) / window_steps) + 1

    def build(self, max_new_tokens: int) -> AdaptiveSchedule:
        self.check(max_new_tokens)
        return AdaptiveSchedule(
            start_tokens=self.start_tokens, step_tokens=self.step_tokens,
            max_tokens=self.max_tokens if self.max_tokens is not None else max_new_tokens, window=self.window,
            settle_threshold=self.settle_threshold, late_kl_ratio=self.late_kl_ratio,
            min_probe_tokens=self.min_probe_tokens,
        )


@dataclass(frozen=True)
class AdaptiveSchedule:
    start_tokens: int
    step_tokens: int
    max_tokens: int
    window: int
    settle_threshold: float
    late_kl_ratio: float
    min_probe_tokens: int

    def horizon(self, state: LearnerState, rng: random.Random) -> int:
        return self.decide(state.kl_windows, state.bucket_tokens)

    def decide(self, windows: Sequence[KLWindow], bucket_tokens: int) -> int:
        """The horizon from the learner's KL windows (oldest first) alone (module docstring)."""
        current = min(self.max_tokens, max([self.start_tokens, *(w.horizon_max for w in windows)]))
        if current >= self.max_tokens:
            return self.max_tokens
        at_current = [w for w in windows if w.samples > 0 and w.horizon_min == w.horizon_max == current]
        for i in range(len(at_current) - self.window + 1):
            run = at_current[i:i + self.window]
            if self.settled(run) and not self.vetoed(run, current, bucket_tokens):
                return min(self.max_tokens, current + self.step_tokens)
        return current

    def settled(self, run: Sequence[KLWindow]) -> bool:
        """Relative improvement of the trained KL from the first half of `run` to the second below the threshold."""
        half = len(run) // 2
        first = sum(_trained_kl(w) for w in run[:half]) / half
        second = sum(_trained_kl(w) for w in run[len(run) - half:]) / half
        if first <= 0:  # nothing left to improve (the sampled estimate can dip below 0)
            return True
        return (first - second) / first < self.settle_threshold

    def vetoed(self, run: Sequence[KLWindow], current: int, bucket_tokens: int) -> bool:
        """The probes say the tokens past the horizon carry little signal: their KL is low next to the KL within it."""
        if bucket_tokens < 1 or self.late_kl_ratio == 0:
            return False
        late = _probe_kl(run, lambda b: b * bucket_tokens >= current)
        early = _probe_kl(run, lambda b: (b + 1) * bucket_tokens <= current)
        if late is None or early is None or late[1] < self.min_probe_tokens:
            return False
        return late[0] < self.late_kl_ratio * early[0]


def _trained_kl(window: KLWindow) -> float:
    """Token-weighted mean KL of the window's trained tokens."""
    tokens = sum(window.tokens_by_bucket)
    return sum(k * t for k, t in zip(window.kl_by_bucket, window.tokens_by_bucket, strict=True)) / max(tokens, 1)


def _probe_kl(run: Sequence[KLWindow], keep: Callable[[int], bool]) -> tuple[float, int] | None:
    """(token-weighted mean KL, tokens) of the probes' tokens in the buckets `keep(b)` selects, over `run`."""
    total = tokens = 0.0
    for w in run:
        for b, (k, t) in enumerate(zip(w.probe_kl_by_bucket, w.probe_tokens_by_bucket, strict=True)):
            if keep(b):
                total += k * t
                tokens += t
    return (total / tokens, int(tokens)) if tokens else None
