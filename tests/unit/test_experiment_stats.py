"""The experiment's bootstrap (opd/experiment/stats.py), on synthetic curves.

Pins:
- deterministic given the bootstrap seed, and a different seed draws differently;
- rows whose seeds overlap give a compute ratio whose interval includes 1 ("not separated"), rows that differ
  at every seed give one that excludes it ("beats" / "behind");
- a seed that never reaches the target is censored at the cap, not dropped (dropping it would make a row
  that fails half the time look as fast as its lucky seeds);
- per-problem results are resampled (a single seed still gets an interval from its problems).
"""

from __future__ import annotations

import numpy as np
import pytest

from opd.experiment.stats import BEATS, BEHIND, NOT_SEPARATED, Bootstrap, RunCurves, analyse, curves_of

FLOPS = np.array([0.0, 10.0, 20.0, 30.0, 40.0])
CAP = 50.0


def _run(acc: list[float]) -> RunCurves:
    return RunCurves(flops_C=FLOPS, accuracy_C=np.array(acc), kl_C=1.0 - np.array(acc))


def _ref() -> list[RunCurves]:
    # reaches 0.8 (its mean final accuracy) at mark 3 (30 FLOPs) on every seed
    return [_run([0.0, 0.2, 0.4, 0.85, 0.8 + d]) for d in (-0.01, 0.0, 0.01, 0.0, 0.0)]


def test_deterministic_given_the_seed() -> None:
    spread = np.random.default_rng(0).random((7, 5)) * 0.2
    rows = {"ref": _ref(), "row": [_run(list(np.array([0.0, 0.3, 0.6, 0.75, 0.8]) + d)) for d in spread]}
    a = analyse(rows, "ref", "accuracy", CAP, Bootstrap(resamples=500, seed=3))
    b = analyse(rows, "ref", "accuracy", CAP, Bootstrap(resamples=500, seed=3))
    c = analyse(rows, "ref", "accuracy", CAP, Bootstrap(resamples=500, seed=4))
    assert a["row"]["reach"]["ratio"] == b["row"]["reach"]["ratio"]
    assert a["row"]["marks"][2] == b["row"]["marks"][2]
    assert a["row"]["marks"][2] != c["row"]["marks"][2]  # another seed, other draws


def test_separated_rows_exclude_one() -> None:
    fast = [_run([0.0, 0.85, 0.9, 0.9, 0.9]) for _ in range(5)]  # every seed at mark 1 (10 FLOPs) vs 30
    slow = [_run([0.0, 0.0, 0.0, 0.0, 0.1]) for _ in range(5)]  # never: censored at 50
    out = analyse({"ref": _ref(), "fast": fast, "slow": slow}, "ref", "accuracy", CAP, Bootstrap(resamples=500))
    fast_r, slow_r = out["fast"]["reach"], out["slow"]["reach"]
    assert fast_r["ratio"].point == pytest.approx(3.0) and fast_r["ratio"].low > 1 and fast_r["verdict"] == BEATS
    assert slow_r["ratio"].point == pytest.approx(30 / 50) and slow_r["verdict"] == BEHIND
    assert slow_r["reached"] == 0 and slow_r["restricted_mean"].point == CAP


def test_overlapping_rows_include_one() -> None:
    # Reached at 20, 40, 30, never (50), 10: a mean of 30, the reference's, with seeds on both sides of it.
    mixed = [_run(a) for a in ([0.0, 0.0, 0.85, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0, 0.9], [0.0, 0.0, 0.0, 0.85, 0.9],
                               [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.85, 0.9, 0.9, 0.9])]
    out = analyse({"ref": _ref(), "mixed": mixed}, "ref", "accuracy", CAP, Bootstrap(resamples=1000))
    r = out["mixed"]["reach"]
    assert r["ratio"].point == pytest.approx(1.0)
    assert r["ratio"].low < 1 < r["ratio"].high and r["verdict"] == NOT_SEPARATED
    assert out["ref"]["reach"]["ratio"].point == 1.0


def test_censored_seeds_are_counted_not_dropped() -> None:
    # One lucky seed at 10 FLOPs and four that never reach: dropping the four would give 10 (ratio 3x, "beats").
    lucky = [_run([0.0, 0.9, 0.9, 0.9, 0.9])] + [_run([0.0, 0.1, 0.1, 0.1, 0.1]) for _ in range(4)]
    out = analyse({"ref": _ref(), "lucky": lucky}, "ref", "accuracy", CAP, Bootstrap(resamples=1000))
    r = out["lucky"]["reach"]
    assert (r["reached"], r["of"]) == (1, 5)
    assert r["restricted_mean"].point == pytest.approx((10 + 4 * CAP) / 5)
    assert r["ratio"].point == pytest.approx(30 / 42) and r["verdict"] != BEATS


def test_kl_is_lower_is_better() -> None:
    rows = {"ref": _ref(), "fast": [_run([0.0, 0.85, 0.9, 0.9, 0.9]) for _ in range(3)]}
    out = analyse(rows, "ref", "kl", CAP, Bootstrap(resamples=200))
    assert out["fast"]["reach"]["verdict"] == BEATS
    assert out["fast"]["marks"][1].point == pytest.approx(0.15)  # reported as KL, not its negation
    assert out["ref"]["reach"]["target"] == pytest.approx(0.2)


def test_one_seed_gets_an_interval_from_its_problems() -> None:
    rng = np.random.default_rng(0)
    correct = (rng.random((5, 200)) < np.array([0.0, 0.2, 0.4, 0.6, 0.8])[:, None]).astype(float)
    record = {"checkpoints": [{"flops": {"total": f}, "eval": {"accuracy": float(c.mean()),
                                                                "correct_by_problem": "".join("1" if x else "0" for x in c)}}
                              for f, c in zip(FLOPS, correct, strict=True)]}
    run = curves_of(record)
    assert run.correct_CP is not None and run.correct_CP.shape == (5, 200)
    out = analyse({"ref": [run]}, "ref", "accuracy", CAP, Bootstrap(resamples=500))
    last = out["ref"]["marks"][-1]
    assert last.low < last.point < last.high and last.high - last.low > 0.05  # ~ +-2.8 points at p=0.8, n=200
