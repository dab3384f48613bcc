"""The probe estimator of tokens saved by truncation (protocol/savings.py), on synthetic runs.

Pins:
- the estimate is unbiased: over many simulated runs (lengths with EOS, drawn afresh per rollout; a horizon
  and a length distribution that drift together over the run, as under a progressive schedule), the mean
  of (estimate - realised saving) is within a few standard errors of 0;
- its standard error is calibrated: the mean reported variance matches the variance of the errors;
- the budget bound (`max_new_tokens - horizon`) overstates the realised saving, by far more than noise;
- one pooled E[min(L, T)] minus the tokens generated is noisier (why each probe carries its own horizon);
- tallies add up across actors, and the estimate needs one probe (its error two).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocol.savings import ProbeTally, SavingsEstimate, estimate_savings, probe_saving, saving_bound

T = 128  # max_new_tokens
ROLLOUTS = 600
PROBE_FRACTION = 0.05
RUNS = 3000


def _simulate(rng: np.random.Generator) -> dict[str, float]:
    """One run: every rollout's latent full length, its horizon, and which rollouts were probes."""
    t = np.linspace(0.0, 1.0, ROLLOUTS)
    # Answers get shorter as the student learns to stop (mean 110 -> 40 tokens); lengths with EOS, capped at T.
    lengths = np.minimum(rng.geometric(1.0 / (110 - 70 * t)), T)
    horizons = np.minimum(T, np.floor(8 + (T - 8) * t / 0.6)).astype(int)  # from 8 tokens to T at 60% of the run
    probes = (rng.random(ROLLOUTS) < PROBE_FRACTION) & (horizons < T)  # as the actor: only truncated ones probe
    generated = np.minimum(lengths, horizons)
    realised = np.minimum(lengths, T) - generated  # what truncation saved on each rollout
    tally = ProbeTally.of(probe_saving(int(L), int(h)) for L, h in zip(lengths[probes], horizons[probes], strict=True))
    est = estimate_savings(tally, int((~probes & (horizons < T)).sum()))
    finished = lengths < horizons
    bound = sum(saving_bound(int(h), T, bool(f)) for h, f in zip(horizons[~probes], finished[~probes], strict=True))
    # E[min(L, T)] from the probes' lengths pooled over the run, minus what was generated, over the truncated prefixes
    cut = ~probes & (horizons < T)
    pooled = cut.sum() * lengths[probes].mean() - generated[cut].sum() if probes.any() else math.nan
    return {"truth": float(realised[~probes].sum()), "estimate": est.tokens if est else math.nan,
            "stderr": est.stderr if est and est.stderr is not None else math.nan, "bound": float(bound),
            "pooled": float(pooled)}


@pytest.fixture(scope="module")
def runs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20260514)
    rows = [_simulate(rng) for _ in range(RUNS)]
    out = {key: np.array([r[key] for r in rows]) for key in rows[0]}
    usable = ~np.isnan(out["stderr"])  # at least two probes (almost every run: 18 expected)
    assert usable.mean() > 0.99
    return {key: value[usable] for key, value in out.items()}


def _mean_and_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def test_the_estimate_is_unbiased(runs: dict[str, np.ndarray]) -> None:
    mean, se = _mean_and_se(runs["estimate"] - runs["truth"])
    assert abs(mean) < 4 * se, (mean, se)
    assert se < 0.01 * runs["truth"].mean()  # the check has resolution: within 1% of the saving


def test_the_standard_error_is_calibrated(runs: dict[str, np.ndarray]) -> None:
    errors = runs["estimate"] - runs["truth"]
    ratio = float(np.mean(runs["stderr"] ** 2) / errors.var(ddof=1))
    assert 0.8 < ratio < 1.25, ratio
    covered = float(np.mean(np.abs(errors) <= 2 * runs["stderr"]))
    assert 0.88 < covered < 0.99, covered  # n ~ 30 probes of a skewed saving: a little under 95%


def test_the_budget_bound_overstates_the_saving(runs: dict[str, np.ndarray]) -> None:
    mean, se = _mean_and_se(runs["bound"] - runs["truth"])
    assert mean > 20 * se and mean > 0.2 * runs["truth"].mean(), (mean, se)
    assert (runs["bound"] >= runs["truth"]).all()  # a bound: never below what was saved


def test_a_pooled_length_is_noisier_than_each_probes_own_saving(runs: dict[str, np.ndarray]) -> None:
    """Why each probe carries its own horizon: sum(E[min(L, T)] - generated) over the truncated prefixes, with one
    pooled E[min(L, T)] from the probes' lengths, is unbiased too here, but noisier: it carries the spread of
    whole lengths, where the probes' own savings carry only the spread past each horizon."""
    mean, se = _mean_and_se(runs["pooled"] - runs["truth"])
    assert abs(mean) < 4 * se, (mean, se)
    assert (runs["pooled"] - runs["truth"]).std() > 1.15 * (runs["estimate"] - runs["truth"]).std()


def test_tallies_add_up_and_small_samples_say_what_they_can() -> None:
    a, b = ProbeTally.of([0, 3, 5]), ProbeTally.of([7])
    assert a + b == ProbeTally.of([0, 3, 5, 7]) == ProbeTally().add(0).add(3).add(5).add(7)
    assert estimate_savings(ProbeTally(), 100) is None
    assert estimate_savings(ProbeTally(), 0) == SavingsEstimate(0.0, 0.0, 0, 0)  # nothing truncated: nothing saved
    one = estimate_savings(ProbeTally.of([4]), 10)
    assert one is not None and one.tokens == 40 and one.stderr is None
    two = estimate_savings(ProbeTally.of([2, 4]), 10)
    assert two is not None and two.tokens == 30 and two.stderr == pytest.approx(math.sqrt(2) * math.sqrt(100 / 2 + 10))
    assert two.fraction_of_full(generated=90) == pytest.approx(0.25)


def test_probe_saving_and_bound_per_rollout() -> None:
    assert probe_saving(100, 16) == 84 and probe_saving(10, 16) == 0
    assert saving_bound(16, 128, finished=False) == 112 and saving_bound(16, 128, finished=True) == 0
    with pytest.raises(ValueError, match="horizon"):
        probe_saving(5, 0)
