"""The experiment's numbers: per row and compute mark, the mean over seeds and its bootstrap interval; the tables.

A run record (`runs/<row>/seed<k>/run.json`, written by suite.py) holds its checkpoints, index 0 being the
student before training (0 FLOPs), each with the FLOPs spent when it was kept, the wall-clock and the
held-out evaluation (per problem and per prompt where the evaluator recorded them). Rows are compared at
the nominal marks (budget x i / checkpoints); the FLOPs a run had actually spent there are at or just past
the mark and are reported as such.

"Compute to reach the reference's final quality" and every interval: stats.py (a percentile bootstrap over
seeds and held-out problems; seeds that never reach the target are censored, not dropped). The table says a
row *beats* the reference only when the interval of the compute ratio excludes 1, and says nothing stronger.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from protocol.compute import format_flops
from protocol.savings import ProbeTally, estimate_savings


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for no values; std None for one)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def savings(stats: dict[str, float]) -> dict[str, float | None]:
    """Student tokens generated, and saved by truncation as the probes estimate it (protocol/savings.py)."""
    est = estimate_savings(ProbeTally(int(stats.get("actor_probes", 0)), stats.get("probe_saving_sum", 0.0),
                                      stats.get("probe_saving_sq_sum", 0.0)), int(stats.get("actor_truncated", 0)))
    generated = stats.get("actor_tokens_generated", 0.0)
    return {"generated": generated, "saved_estimate": None if est is None else est.tokens,
            "saved_stderr": None if est is None else est.stderr,
            "saved_fraction": None if est is None else est.fraction_of_full(generated)}


def aggregate_row(row: dict[str, Any], runs: list[dict[str, Any]], checkpoints: int) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "ok"]
    out: dict[str, Any] = {**row, "seeds": [r["seed"] for r in ok],
                           "skipped": next((r["reason"] for r in runs if r["status"] == "skipped"), None),
                           "failed": {r["seed"]: r["reason"] for r in runs if r["status"] == "failed"}}
    marks = []
    for i in range(checkpoints + 1):
        at = [r["checkpoints"][i] for r in ok if len(r["checkpoints"]) > i]
        evals = [c.get("eval") or {} for c in at]
        kl = mean_std([e["reverse_kl"] for e in evals if "reverse_kl" in e])
        acc = mean_std([e["accuracy"] for e in evals if "accuracy" in e])
        fin = mean_std([e["finished"] for e in evals if "finished" in e])
        marks.append({"index": i, "mark_flops": at[0]["mark_flops"] if at else None,
                      "flops": mean_std([c["flops"]["total"] for c in at])[0],
                      "wall_s": mean_std([c["wall_s"] for c in at])[0], "kl": kl[0], "kl_std": kl[1],
                      "accuracy": acc[0], "accuracy_std": acc[1], "finished": fin[0], "n": len(at)})
    out["checkpoints"] = marks
    out["steps"] = mean_std([float(r["steps"]) for r in ok])[0]
    out["wall_s"] = mean_std([float(r["wall_s"]) for r in ok])[0]
    saved = [savings(r.get("stats") or {}) for r in ok if r.get("stats")]
    out["generated"] = mean_std([s["generated"] for s in saved])[0]
    out["saved_fraction"] = mean_std([s["saved_fraction"] for s in saved if s["saved_fraction"] is not None])[0]
    stats = [r.get("stats") or {} for r in ok if r.get("stats")]
    out["cache_flops"] = mean_std([float(st.get("flops_saved_cache", 0.0)) for st in stats])[0]
    out["teacher_flops"] = mean_std([float(st.get("flops_teacher", 0.0)) for st in stats])[0]
    out["probe_truth"] = [{"seed": r["seed"], **truth} for r in ok if (truth := probe_truth(r.get("stats") or {}))]
    return out


def probe_truth(stats: dict[str, float]) -> dict[str, float] | None:
    """A `actor.probe_truth` run's check of the savings estimate: the estimate over the rollouts that were not
    probes, its stated standard error, and the true saving of those same rollouts (None for other runs)."""
    if "truth_saving_sum" not in stats:
        return None
    est = estimate_savings(ProbeTally(int(stats.get("actor_probes", 0)), stats.get("probe_saving_sum", 0.0),
                                      stats.get("probe_saving_sq_sum", 0.0)), int(stats.get("actor_truncated", 0)))
    if est is None:
        return None
    truth = float(stats["truth_saving_sum"])
    z = (est.tokens - truth) / est.stderr if est.stderr else None
    return {"estimate": est.tokens, "stderr": est.stderr if est.stderr is not None else float("nan"), "truth": truth,
            "probes": est.probes, "rollouts": est.rollouts, "z": z if z is not None else float("nan")}


def probe_check(rows: list[dict[str, Any]]) -> list[str]:
    """The Markdown section comparing the probe estimate with the truth, for rows run with `actor.probe_truth`."""
    checked = [(row, t) for row in rows for t in row.get("probe_truth") or []]
    if not checked:
        return []
    lines = ["## Truncation savings: the probe estimate against the truth", "",
             "Rows run with `actor.probe_truth: true`: every truncated rollout was also sampled to full length, so "
             "the tokens truncation saved on the rollouts that were not probes are known exactly; the estimate is "
             "what protocol/savings.py computes from the probes alone. z = (estimate - truth) / stated standard "
             "error: an honest standard error gives |z| < 2 about 95% of the time.", "",
             "| row | seed | probes | other truncated rollouts | estimate (tokens) | stated std. error | truth (tokens) "
             "| error | z |", "|---" * 9 + "|"]
    for row, t in checked:
        lines.append(f"| {row['label']} | {t['seed']} | {t['probes']} | {t['rollouts']} | {t['estimate']:.0f} | "
                     f"{t['stderr']:.0f} | {t['truth']:.0f} | {t['estimate'] - t['truth']:+.0f} | {t['z']:+.2f} |")
    return [*lines, ""]


def _stats_inputs(cfg: Any, records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    from opd.experiment.stats import curves_of

    return {row.name: [curves_of(r) for r in records if r["row"] == row.name and r["status"] == "ok"]
            for row in cfg.rows}


def _wall_to_reach(runs: list[dict[str, Any]], metric: str, target: float) -> float | None:
    """Mean wall-clock at which the seeds that reached the target first did (a side column, not a claim)."""
    walls = []
    for r in runs:
        for c in r["checkpoints"]:
            value = (c.get("eval") or {}).get("accuracy" if metric == "accuracy" else "reverse_kl")
            if value is not None and (value >= target - 1e-12 if metric == "accuracy" else value <= target + 1e-12):
                walls.append(c["wall_s"])
                break
    return mean_std(walls)[0]


def aggregate(cfg: Any, records: list[dict[str, Any]], *, preset: str | None, command: str) -> dict[str, Any]:
    """Everything the table and the plots show, from the run records: means, bootstrap intervals (stats.py)."""
    from opd.experiment.stats import Bootstrap, analyse

    rows = []
    for row in cfg.rows:
        runs = [r for r in records if r["row"] == row.name]
        charged = {r["charge_cache"] for r in runs if "charge_cache" in r}  # what the runs did, where recorded
        rows.append(aggregate_row({"name": row.name, "label": row.label or row.name, "kind": row.kind,
                                   "charge_cache": charged.pop() if len(charged) == 1 else cfg.charges_cache(row)},
                                  runs, cfg.checkpoints))
    ref = next((r for r in rows if r["name"] == cfg.reference_row and r["seeds"]), None)
    metric = "accuracy" if ref is not None and ref["checkpoints"][-1]["accuracy"] is not None else "kl"
    boot = Bootstrap(resamples=cfg.bootstrap.resamples, seed=cfg.bootstrap.seed, level=cfg.bootstrap.level)
    cap = cfg.budget_flops * (cfg.checkpoints + 1) / cfg.checkpoints
    curves = _stats_inputs(cfg, records)
    per_problem = any(c.correct_CP is not None or c.kl_sum_CQ is not None for runs in curves.values() for c in runs)
    for key in ("accuracy", "kl"):
        try:
            result = analyse(curves, ref["name"] if ref is not None and key == metric else None, key, cap, boot)
        except ValueError:  # no such measurement (e.g. no accuracy without the task's checker)
            continue
        for row in rows:
            got = result.get(row["name"])
            if got is None:
                continue
            for c, iv in zip(row["checkpoints"], got["marks"], strict=False):
                c[f"{key}_ci"] = [iv.low, iv.high]
            if "reach" in got:
                r = got["reach"]
                runs = [x for x in records if x["row"] == row["name"] and x["status"] == "ok"]
                row["reach"] = {"target": r["target"], "reached": r["reached"], "of": r["of"], "cap": r["cap"],
                                "restricted_mean": r["restricted_mean"].as_dict(), "ratio": r["ratio"].as_dict(),
                                "verdict": "reference" if row["name"] == cfg.reference_row else r["verdict"],
                                "wall_s": _wall_to_reach(runs, key, r["target"])}
    target = ref["checkpoints"][-1][metric] if ref is not None else None
    initial = ref["checkpoints"][0][metric] if ref is not None else None
    trivial = target is not None and initial is not None and (initial >= target if metric == "accuracy"
                                                              else initial <= target)
    return {"name": cfg.name, "command": command, "preset": preset, "budget_flops": cfg.budget_flops,
            "checkpoints": cfg.checkpoints, "seeds": cfg.seeds, "reference_row": cfg.reference_row,
            "target_metric": metric, "target": target, "target_accuracy": target if metric == "accuracy" else None,
            "target_trivial": trivial, "cap_flops": cap, "per_problem": per_problem,
            "bootstrap": {"resamples": boot.resamples, "seed": boot.seed, "level": boot.level}, "rows": rows}


def _ci(mean: float | None, ci: list[float] | None, scale: float = 1.0, digits: int = 1) -> str:
    """`mean [low, high]` (the bootstrap interval), or the mean alone where there is none."""
    if mean is None:
        return "-"
    text = f"{mean * scale:.{digits}f}"
    if ci is None or ci[0] == ci[1] == mean:
        return text
    return text + f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def _quality_tables(summary: dict[str, Any], heads: list[str]) -> list[str]:
    lines: list[str] = []
    for title, key, scale, digits in (("Held-out greedy exact match (%)", "accuracy", 100.0, 1),
                                      ("Held-out full-length reverse KL to the teacher (nats/token)", "kl", 1.0, 3)):
        if not any(c[key] is not None for row in summary["rows"] for c in row["checkpoints"]):
            continue
        lines += [f"## {title}", "", "| row | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
        for row in summary["rows"]:
            if row["seeds"]:
                cells = [_ci(c[key], c.get(f"{key}_ci"), scale, digits) for c in row["checkpoints"]]
                lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _reach_cells(row: dict[str, Any]) -> list[str]:
    r = row.get("reach") or {}
    rm, ratio = r.get("restricted_mean"), r.get("ratio")
    cache = row.get("cache_flops")
    return [
        row["label"],
        f"{format_flops(rm['point'])} [{format_flops(rm['low'])}, {format_flops(rm['high'])}]" if rm else "-",
        f"{ratio['point']:.2f}x [{ratio['low']:.2f}, {ratio['high']:.2f}]" if ratio else "-",
        r.get("verdict", "-"), f"{r.get('reached', 0)}/{r.get('of', 0)}",
        f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "-",
        f"{row['steps']:.0f}" if row["steps"] is not None else "-",
        f"{row['wall_s']:.0f}" if row["wall_s"] is not None else "-",
        f"{row['generated']:.0f}" if row["generated"] is not None else "-",
        f"{100 * row['saved_fraction']:.0f}%" if row["saved_fraction"] is not None else "-",
        "-" if row["kind"] == "trl" or cache is None else
        f"{format_flops(cache)} ({'charged' if row.get('charge_cache', True) else 'free'})"]


def markdown(summary: dict[str, Any]) -> str:
    """The table file: quality by compute mark with intervals, then compute to reach the reference's final quality."""
    n, budget = summary["checkpoints"], summary["budget_flops"]
    heads = ["0"] + [f"{100 * i // n}% ({format_flops(budget * i / n)})" for i in range(1, n + 1)]
    rows, boot = summary["rows"], summary.get("bootstrap") or {}
    over = "seeds and held-out problems" if summary.get("per_problem") else "seeds only (the records hold no per-problem results)"
    lines = [f"# Truncation experiment `{summary['name']}`", "",
             f"Command: `{summary['command']}`. Budget {format_flops(budget)} per run (generation + teacher + learner, "
             f"protocol/compute.py), held-out evaluation at {n} compute marks, seeds {summary['seeds']}. Cells: mean "
             f"over seeds [{100 * boot.get('level', 0.95):.0f}% percentile bootstrap interval over {over}; "
             f"{boot.get('resamples', '?')} resamples, seed {boot.get('seed', '?')}]."
             + (f" **Preset `{summary['preset']}`**: only the rows below." if summary.get("preset") else ""), ""]
    lines += _quality_tables(summary, heads)
    metric, target = summary.get("target_metric", "accuracy"), summary.get("target")
    shown = ("no reference row ran" if target is None else
             f"{100 * target:.1f}% exact match" if metric == "accuracy" else f"reverse KL {target:.3f}")
    lines += [f"## Compute to reach `{summary['reference_row']}`'s final quality ({shown})", "",
              "| row | compute to reach (restricted mean) | vs reference | verdict | seeds reached | wall-clock to reach (s) "
              "| learner steps at budget | wall-clock at budget (s) | student tokens generated "
              "| saved by truncation (probe est., % of full) | teacher FLOPs served by the cache |",
              "|---" * 11 + "|"]
    lines += ["| " + " | ".join(_reach_cells(row)) + " |" for row in rows if row["seeds"]]
    if summary.get("target_trivial"):
        lines += ["", f"The student already had `{summary['reference_row']}`'s final quality before training: this "
                  "table says nothing here; compare the curves."]
    verdicts = {v: [row["label"] for row in rows if (row.get("reach") or {}).get("verdict") == v]
                for v in ("beats", "behind")}
    said = "; ".join(f"{', '.join(names)}: {v} the reference" for v, names in verdicts.items() if names)
    lines += ["", f"Verdict: {said or 'no row separated from the reference'}. (A row beats, or is behind, the "
              f"reference only when the {100 * boot.get('level', 0.95):.0f}% interval of its compute ratio excludes 1; "
              "a row not separated from it is not shown equal to it either.)"]
    counts = [len(row["seeds"]) for row in rows if row["seeds"]]
    fewest, most = min(counts, default=0), max(counts, default=0)
    if 0 < fewest < 5:
        span = f"{fewest}" if fewest == most else f"{fewest} to {most}"
        lines += ["", f"**{span} seed{'s' if most > 1 else ''} per row**: a bootstrap over fewer than 5 seeds is "
                  "too narrow (two seeds give three possible means), so these verdicts are provisional; 5 or more per "
                  "row before any is reported."]
    notes = [f"- `{row['name']}` skipped: {row['skipped']}" for row in rows if row["skipped"]]
    notes += [f"- `{row['name']}` seed {seed} failed: {reason.splitlines()[0]}" for row in rows
              for seed, reason in row["failed"].items()]
    if notes:
        lines += ["", "Not run:", *notes]
    cap = summary.get("cap_flops")
    lines += ["", "Compute to reach: FLOPs at each seed's first checkpoint at or past the target (resolution one mark); "
              "a seed that never reaches it is censored at one mark past the budget"
              + (f" ({format_flops(cap)})" if cap else "") + ", not dropped, and the row's number is the mean over "
              "its seeds (a restricted mean). vs reference: the reference's restricted mean divided by the row's "
              "(above 1: less compute); the target is re-estimated in every bootstrap replicate. A row beats the "
              "reference only when the ratio's whole interval is above 1. Teacher FLOPs served by the cache: what "
              "full cache hits would have cost the teacher; `charged`: counted in the budget anyway (the "
              "compute-matched comparison), `free`: not counted (what the cache buys). Wall-clock counts from the "
              "learner's first published state; evaluation is outside the budget and the clock.", ""]
    lines += probe_check(rows)
    return "\n".join(lines)


def write(results: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """table.md and results.json (the summary and every run record, timelines included)."""
    (results / "table.md").write_text(markdown(summary))
    (results / "results.json").write_text(json.dumps({"summary": summary, "runs": records}, indent=1) + "\n")
