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
5. End-of-answer guard (`finish_drop`): the probes are full-length rollouts, so the fraction of them that
   end at EOS is how often the student still finishes its answers. If, over the last `window` windows at
   `H`, that fraction fell by more than `finish_drop` from the first half to the second (each half holding at
   least `min_guard_probes` probes), the horizon grows whatever the KL says: positions past `H` are drifting
   untrained, which is how the schedule collapsed to 0% exact match in one of two seeds of the truncation
   experiment (docs/experiments.md). The guard overrides the veto: a low KL past `H` on answers that no
   longer end is not evidence that the late positions are learnt.

EXPERIMENTAL: this schedule collapsed in one seed of two in the truncation experiment, and the guard has not
been shown to prevent that over several seeds; do not use it as a default (docs/experiments.md).

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
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.state import KLWindow, LearnerState


class AdaptiveScheduleConfig(BaseModel):
    """EXPERIMENTAL (collapsed in 1 of 2 seeds of the truncation experiment; not shown stable over 5 seeds):
    `actor.schedule` grown by the learner's measurements (reverse KL by position, probes past the horizon, the
    probes' finish rate)."""

    model_config = ConfigDict(extra="forbid")
    experimental: ClassVar[bool] = True  # `opd config docs` tags it; `opd learner` warns (opd/config.py advisories)

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
    finish_drop: float | None = Field(0.1, gt=0, le=1, description="End-of-answer guard: grow the horizon when the "
                                      "probes' EOS rate over the last `window` windows fell by more than this "
                                      "(absolute) from the first half to the second (None: no guard).")
    min_guard_probes: int = Field(8, ge=1, description="Probes each half of the window needs before the guard acts.")

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
            min_probe_tokens=self.min_probe_tokens, finish_drop=self.finish_drop,
            min_guard_probes=self.min_guard_probes,
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
    finish_drop: float | None = None
    min_guard_probes: int = 8

    def horizon(self, state: LearnerState, rng: random.Random) -> int:
        return self.decide(state.kl_windows, state.bucket_tokens)

    def decide(self, windows: Sequence[KLWindow], bucket_tokens: int) -> int:
        """The horizon from the learner's KL windows (oldest first) alone (module docstring)."""
        current = min(self.max_tokens, max([self.start_tokens, *(w.horizon_max for w in windows)]))
        if current >= self.max_tokens:
            return self.max_tokens
        at_current = [w for w in windows if w.samples > 0 and w.horizon_min == w.horizon_max == current]
        if self.finish_falling(at_current[-self.window:]):
            return min(self.max_tokens, current + self.step_tokens)
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

    def finish_falling(self, run: Sequence[KLWindow]) -> bool:
        """The end-of-answer guard: the probes' EOS rate fell by more than `finish_drop` across `run` (a full window)."""
        if self.finish_drop is None or len(run) < self.window:
            return False
        half = len(run) // 2
        first, second = run[:half], run[len(run) - half:]
        n1, n2 = sum(w.probes for w in first), sum(w.probes for w in second)
        if min(n1, n2) < self.min_guard_probes:
            return False
        rate1 = sum(w.probes_finished for w in first) / n1
        rate2 = sum(w.probes_finished for w in second) / n2
        return rate1 - rate2 > self.finish_drop

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
