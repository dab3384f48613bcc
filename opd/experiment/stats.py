"""Bootstrap intervals for the experiment's table: quality at each compute mark, and compute to reach a target.

WHY a bootstrap and not mean +- std: the question the table answers is "does row A need less compute than
row B", a ratio of two noisy quantities whose noise comes from two places, the seeds (a run's own
sampling) and the held-out problems (a finite sample of the task). A percentile bootstrap resamples both
and needs no distributional assumption about either.

Resampling, one replicate:
- held-out problems (and KL prompts) are drawn with replacement once per replicate and the same draw is
  applied to every run and checkpoint (they all answered the same problems: paired), when the run
  records hold per-problem results (`eval.correct_by_problem`, `eval.kl_by_prompt`; older records hold
  only the means, and then only seeds are resampled);
- each row's seeds are drawn with replacement, independently per row (a seed number shares nothing
  across rows but the starting student, which every run shares anyway).

"Compute to reach the reference's final quality": the target is the reference row's mean quality at its
last mark, recomputed in every replicate from that replicate's reference seeds and problems (the target
is itself an estimate). A run reaches it at its first checkpoint at or past it (FLOPs actually spent
there; resolution one mark). A run that never reaches it is *censored*, not dropped: it counts as
reaching at `cap` = one mark past the budget, and a row's statistic is the **restricted mean** of its
seeds' compute to reach (the mean of min(reach, cap), survival analysis' restricted mean time). The cap
is the earliest a censored run could have reached, so it flatters a row whose seeds fail to reach; a row
whose seeds mostly fail still comes out near the cap, above a reference that reaches.

The ratio is reference / row (above 1: the row needed less compute). A row *beats* the reference only
when the whole interval of the ratio is above 1, and is *behind* only when it is below 1; otherwise the
rows are *not separated* and the table says exactly that. With few seeds a bootstrap interval is too
narrow (two seeds give three possible means): the verdict is necessary, not sufficient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BEATS, BEHIND, NOT_SEPARATED = "beats", "behind", "not separated"


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval (`low`, `high`)."""

    point: float
    low: float
    high: float

    def verdict(self) -> str:
        """For a ratio (reference / row): `beats` only when the interval excludes 1 from above."""
        if self.low > 1.0:
            return BEATS
        if self.high < 1.0:
            return BEHIND
        return NOT_SEPARATED

    def as_dict(self) -> dict[str, float]:
        return {"point": self.point, "low": self.low, "high": self.high}


@dataclass
class RunCurves:
    """One run's held-out measurements at checkpoints 0..C (what a replicate resamples).

    `flops_C`: FLOPs spent at each checkpoint. `correct_CP`: per-problem exact match (None: only `accuracy_C`
    is known). `kl_sum_CQ` / `kl_tokens_CQ`: per-prompt summed KL and token count (None: only `kl_C`).
    """

    flops_C: np.ndarray
    accuracy_C: np.ndarray | None
    kl_C: np.ndarray | None
    correct_CP: np.ndarray | None = None
    kl_sum_CQ: np.ndarray | None = None
    kl_tokens_CQ: np.ndarray | None = None


def curves_of(record: dict[str, Any]) -> RunCurves:
    """A run record's checkpoints (report.py's layout) as arrays; missing measurements become NaN."""
    cps = record["checkpoints"]
    evals = [c.get("eval") or {} for c in cps]

    def col(key: str) -> np.ndarray | None:
        vals = [e.get(key) for e in evals]
        return None if all(v is None for v in vals) else np.array([np.nan if v is None else v for v in vals], float)

    per_problem = [e.get("correct_by_problem") for e in evals]
    correct = None
    if all(isinstance(p, str) for p in per_problem) and len({len(p) for p in per_problem}) == 1:  # type: ignore[arg-type]
        correct = np.array([[ch == "1" for ch in p] for p in per_problem], dtype=float)  # type: ignore[union-attr]
    per_prompt = [e.get("kl_by_prompt") for e in evals]
    kl_sum = kl_tok = None
    if all(isinstance(p, dict) for p in per_prompt) and len({len(p["kl_sum"]) for p in per_prompt}) == 1:  # type: ignore[index]
        kl_sum = np.array([p["kl_sum"] for p in per_prompt], float)  # type: ignore[index]
        kl_tok = np.array([p["tokens"] for p in per_prompt], float)  # type: ignore[index]
    return RunCurves(flops_C=np.array([c["flops"]["total"] for c in cps], float), accuracy_C=col("accuracy"),
                     kl_C=col("reverse_kl"), correct_CP=correct, kl_sum_CQ=kl_sum, kl_tokens_CQ=kl_tok)


def _weights(n: int | None, resamples: int, rng: np.random.Generator) -> np.ndarray | None:
    """(n, B) multinomial counts of a with-replacement draw of n items per replicate (None: nothing to draw)."""
    if n is None:
        return None
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).T.astype(float)


def _metric_CB(run: RunCurves, metric: str, w_acc: np.ndarray | None, w_kl: np.ndarray | None,
               resamples: int) -> np.ndarray:
    """(C, B): the run's metric at each checkpoint in each replicate (`higher is better`: KL is negated)."""
    if metric == "accuracy":
        if run.correct_CP is not None and w_acc is not None:
            return run.correct_CP @ w_acc / run.correct_CP.shape[1]
        base = run.accuracy_C
    else:
        if run.kl_sum_CQ is not None and run.kl_tokens_CQ is not None and w_kl is not None:
            return -(run.kl_sum_CQ @ w_kl) / np.maximum(run.kl_tokens_CQ @ w_kl, 1.0)
        base = None if run.kl_C is None else -run.kl_C
    if base is None:
        raise ValueError(f"no {metric} in the run records")
    return np.repeat(base[:, None], resamples, axis=1)


def _common(runs: list[RunCurves], attr: str, axis: int) -> int | None:
    """The shared per-item count of `attr` across runs (None when any run lacks it or they differ)."""
    arrays = [getattr(r, attr) for r in runs]
    if any(a is None for a in arrays):
        return None
    sizes = {a.shape[axis] for a in arrays}
    return sizes.pop() if len(sizes) == 1 else None


def _interval(point: float, samples: np.ndarray, level: float) -> Interval:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return Interval(float(point), float(lo), float(hi))


@dataclass(frozen=True)
class Bootstrap:
    """Settings of one analysis: replicates, the seed of their draws, the interval's level."""

    resamples: int = 2000
    seed: int = 0
    level: float = 0.95


def analyse(rows: dict[str, list[RunCurves]], reference: str | None, metric: str, cap: float,
            boot: Bootstrap) -> dict[str, dict[str, Any]]:
    """Per row: intervals of the metric's mean at each checkpoint, and of compute to reach the reference's final
    quality (restricted mean, censored runs at `cap`) with the ratio reference / row and its verdict.

    `metric`: "accuracy" or "kl" (reported as KL; compared as -KL so that higher is better throughout).
    Deterministic given `boot.seed`. A row with no runs is left out.
    """
    rng = np.random.default_rng(boot.seed)
    B = boot.resamples
    everyone = [r for runs in rows.values() for r in runs]
    w_acc = _weights(_common(everyone, "correct_CP", 1), B, rng)
    w_kl = _weights(_common(everyone, "kl_sum_CQ", 1), B, rng)
    out: dict[str, dict[str, Any]] = {}
    draws: dict[str, np.ndarray] = {}  # per row: (n seeds, B) counts of each seed in each replicate
    values: dict[str, np.ndarray] = {}  # per row: (n, C, B) metric; and (n, C) at the point estimate
    points: dict[str, np.ndarray] = {}
    for name, runs in rows.items():
        if not runs:
            continue
        draws[name] = _weights(len(runs), B, rng)  # type: ignore[assignment]
        values[name] = np.stack([_metric_CB(r, metric, w_acc, w_kl, B) for r in runs])
        points[name] = np.stack([_point(r, metric) for r in runs])
    sign = 1.0 if metric == "accuracy" else -1.0
    for name, vals in values.items():
        n = vals.shape[0]
        mean_CB = np.einsum("ncb,nb->cb", vals, draws[name]) / n
        point_C = points[name].mean(axis=0)
        out[name] = {"marks": [_interval(sign * p, sign * m, boot.level) for p, m in zip(point_C, mean_CB, strict=True)]}
    if reference is None or reference not in values:
        return out
    ref_vals, ref_draw = values[reference], draws[reference]
    target_B = np.einsum("nb,nb->b", ref_vals[:, -1, :], ref_draw) / ref_vals.shape[0]
    target_point = float(points[reference][:, -1].mean())
    ref_reach_B, ref_point = _restricted_mean(rows[reference], ref_vals, ref_draw, target_B, points[reference],
                                              target_point, cap)
    for name, vals in values.items():
        reach_B, reach_point = _restricted_mean(rows[name], vals, draws[name], target_B, points[name], target_point, cap)
        reached = [bool((p >= target_point).any()) for p in points[name]]
        ratio_B = _ratio(ref_reach_B, reach_B)
        out[name]["reach"] = {
            "target": sign * target_point, "restricted_mean": _interval(reach_point, reach_B, boot.level),
            "ratio": _interval(float(_ratio(np.array([ref_point]), np.array([reach_point]))[0]), ratio_B, boot.level),
            "reached": sum(reached), "of": len(reached), "cap": cap}
        out[name]["reach"]["verdict"] = out[name]["reach"]["ratio"].verdict()
    return out


def _point(run: RunCurves, metric: str) -> np.ndarray:
    """(C,): the run's metric on all problems (higher is better)."""
    return _metric_CB(run, metric, None, None, 1)[:, 0] if _has_mean(run, metric) else _full_sample(run, metric)


def _has_mean(run: RunCurves, metric: str) -> bool:
    return (run.accuracy_C if metric == "accuracy" else run.kl_C) is not None


def _full_sample(run: RunCurves, metric: str) -> np.ndarray:
    if metric == "accuracy" and run.correct_CP is not None:
        return run.correct_CP.mean(axis=1)
    if run.kl_sum_CQ is not None and run.kl_tokens_CQ is not None:
        return -run.kl_sum_CQ.sum(axis=1) / np.maximum(run.kl_tokens_CQ.sum(axis=1), 1.0)
    raise ValueError(f"no {metric} in the run records")


def _reach_flops(flops_C: np.ndarray, metric_C: np.ndarray, target: np.ndarray, cap: float) -> np.ndarray:
    """Per replicate: the FLOPs at the first checkpoint whose metric is at or past the target, else `cap`.

    `metric_C` is (C, B) and `target` (B,) (or (C, 1) and (1,) for the point estimate)."""
    hit_CB = metric_C >= target[None, :] - 1e-12
    first = hit_CB.argmax(axis=0)
    return np.where(hit_CB.any(axis=0), flops_C[first], cap)


def _restricted_mean(runs: list[RunCurves], vals: np.ndarray, draw: np.ndarray, target_B: np.ndarray,
                     point_nC: np.ndarray, target_point: float, cap: float) -> tuple[np.ndarray, float]:
    """(B,) restricted mean compute to reach in each replicate, and at the point estimate."""
    reach_nB = np.stack([_reach_flops(r.flops_C, v, target_B, cap) for r, v in zip(runs, vals, strict=True)])
    reach_B = np.einsum("nb,nb->b", reach_nB, draw) / len(runs)
    point = np.mean([_reach_flops(r.flops_C, p[:, None], np.array([target_point]), cap)[0]
                     for r, p in zip(runs, point_nC, strict=True)])
    return reach_B, float(point)


def _ratio(ref: np.ndarray, row: np.ndarray) -> np.ndarray:
    """reference / row; 1 where both are 0 (the untrained student already had the target), inf where only the row is."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = ref / row
    return np.where((ref == 0) & (row == 0), 1.0, out)
