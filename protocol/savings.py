"""How many student tokens truncation saved: the budget bound, and an estimate measured with probes.

Why two numbers. The bound counts `max_new_tokens - horizon` for every prefix stopped at its horizon:
it assumes every full rollout would have run to the budget. Many would have stopped at EOS earlier, so
the bound overstates the saving, by as much as the budget exceeds typical answers.

The estimate measures it. An actor sends a small random fraction of its rollouts (`actor.probe_fraction`,
a Bernoulli draw per rollout from a seeded stream) to full length as probes, after the schedule drew the
horizon `h` it would have given them. A probe's first `h` tokens are distributed exactly as a truncated
rollout's (sampling is autoregressive; truncation only stops it), so its counterfactual saving is observed
exactly::

    s_j = L_j - min(L_j, h_j)      L_j: the probe's length (EOS or the budget), h_j: its drawn horizon

Only rollouts the schedule truncates (`h < max_new_tokens`) may become probes; the others are full
rollouts already and save nothing. Probes are a uniform random subset of the truncated rollouts, so the
mean of `s_j` estimates the mean saving per truncated rollout, and the total over the `N` truncated
rollouts that were not probes is estimated by `N * mean(s)` (unbiased given at least one probe: given
their number, the probes are a uniform random subset).
It holds when horizons and lengths drift together over a run (a progressive schedule truncates early,
while the student's answers are still long): each probe carries its own horizon, drawn at its own time.
`sum(E[min(L, T)] - generated)` over the truncated prefixes, with one pooled `E[min(L, T)]` from the
probes' lengths, is unbiased too but noisier: it carries the spread of whole lengths, where a probe's
own saving carries only the spread past its horizon (tests/unit/test_savings.py measures both).

Its standard error is that of predicting the realised total (not only its expectation)::

    se = sd(s) * sqrt(N**2 / n + N)      n probes, sd with n - 1 degrees of freedom

The probes themselves cost what they generate past their horizon, which is exactly `sum(s_j)`; the
summary reports it next to the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


def probe_saving(length: int, horizon: int) -> int:
    """Tokens a probe of `length` generated past the `horizon` the schedule drew for it (its counterfactual saving)."""
    if length < 0 or horizon < 1:
        raise ValueError(f"probe length must be >= 0 and horizon >= 1, got length={length}, horizon={horizon}")
    return max(0, length - horizon)


@dataclass(frozen=True)
class ProbeTally:
    """Sufficient statistics of the probes' counterfactual savings: count, sum and sum of squares.

    Kept as sums so they add up across actors and over time (`+`, or Redis HINCRBYFLOAT on the run stats).
    """

    probes: int = 0
    saving_sum: float = 0.0
    saving_sq_sum: float = 0.0

    @classmethod
    def of(cls, savings: Iterable[float]) -> ProbeTally:
        values = [float(s) for s in savings]
        return cls(len(values), sum(values), sum(s * s for s in values))

    def add(self, saving: float) -> ProbeTally:
        return ProbeTally(self.probes + 1, self.saving_sum + saving, self.saving_sq_sum + saving * saving)

    def __add__(self, other: ProbeTally) -> ProbeTally:
        return ProbeTally(self.probes + other.probes, self.saving_sum + other.saving_sum,
                          self.saving_sq_sum + other.saving_sq_sum)


@dataclass(frozen=True)
class SavingsEstimate:
    """Estimated tokens saved over `rollouts` non-probe rollouts, with its standard error (None: < 2 probes)."""

    tokens: float
    stderr: float | None
    probes: int
    rollouts: int

    def fraction_of_full(self, generated: float) -> float:
        """The saving as a fraction of what full rollouts would have generated (`generated` + saved)."""
        return self.tokens / max(generated + self.tokens, 1.0)


def estimate_savings(tally: ProbeTally, rollouts: int) -> SavingsEstimate | None:
    """Tokens saved by truncation over `rollouts` non-probe rollouts, from the probes' tally; None without probes.

    Unbiased given at least one probe (module docstring); `stderr` is None with fewer than two probes, since
    one observation says nothing about the spread.
    """
    if rollouts < 0:
        raise ValueError(f"rollouts must be >= 0, got {rollouts}")
    n = tally.probes
    if rollouts == 0:  # nothing was truncated (e.g. the `full` schedule): nothing saved, exactly
        return SavingsEstimate(tokens=0.0, stderr=0.0, probes=n, rollouts=0)
    if n == 0:
        return None
    mean = tally.saving_sum / n
    stderr = None
    if n >= 2:
        variance = max(0.0, (tally.saving_sq_sum - n * mean * mean) / (n - 1))  # rounding can dip below 0
        stderr = math.sqrt(variance) * math.sqrt(rollouts * rollouts / n + rollouts)
    return SavingsEstimate(tokens=rollouts * mean, stderr=stderr, probes=n, rollouts=rollouts)


def saving_bound(horizon: int, max_new_tokens: int, finished: bool) -> int:
    """The budget bound for one rollout: `max_new_tokens - horizon` unless it stopped at EOS before the horizon."""
    return 0 if finished else max_new_tokens - horizon
