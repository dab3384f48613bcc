"""The experiment's numbers: per row and compute mark, mean +- std over seeds; the Markdown table; the JSON.

A run record (`runs/<row>/seed<k>/run.json`, written by suite.py) holds its checkpoints, index 0 being the
student before training (0 FLOPs), each with the FLOPs spent when it was kept, the wall-clock and the
held-out evaluation. Rows are compared at the nominal marks (budget x i / checkpoints); the FLOPs a run had
actually spent there are at or just past the mark and are reported as such.

"To reach full OPD's final accuracy": the target is the reference row's mean accuracy at its last mark; a
run reaches it at its first checkpoint with at least that accuracy (so the resolution is one mark, budget /
checkpoints); the compute and wall-clock reported are the means over the seeds that reached it.
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
    return out


def reach(row: dict[str, Any], runs: list[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """Compute and wall-clock at which each seed's accuracy first reached `target` (means over those that did)."""
    if target is None:
        return {"target": None}
    hits = []
    ok = [r for r in runs if r["status"] == "ok"]
    for r in ok:
        for c in r["checkpoints"]:
            if (c.get("eval") or {}).get("accuracy", -1.0) >= target:
                hits.append(c)
                break
    return {"target": target, "reached": len(hits), "of": len(ok),
            "flops": mean_std([c["flops"]["total"] for c in hits])[0], "wall_s": mean_std([c["wall_s"] for c in hits])[0]}


def aggregate(cfg: Any, records: list[dict[str, Any]], *, preset: str | None, command: str) -> dict[str, Any]:
    """Everything the table and the plots show, from the run records."""
    rows = []
    for row in cfg.rows:
        runs = [r for r in records if r["row"] == row.name]
        rows.append(aggregate_row({"name": row.name, "label": row.label or row.name, "kind": row.kind}, runs,
                                  cfg.checkpoints))
    ref = next((r for r in rows if r["name"] == cfg.reference_row), None)
    target = ref["checkpoints"][-1]["accuracy"] if ref is not None else None
    ref_reach = None
    for row in rows:
        row["reach"] = reach(row, [r for r in records if r["row"] == row["name"]], target)
        if row["name"] == cfg.reference_row:
            ref_reach = row["reach"].get("flops")
    for row in rows:
        flops = row["reach"].get("flops")
        row["reach"]["vs_reference"] = ref_reach / flops if flops and ref_reach else None  # None: 0 / 0 or unknown
    initial = ref["checkpoints"][0]["accuracy"] if ref is not None else None
    return {"name": cfg.name, "command": command, "preset": preset, "budget_flops": cfg.budget_flops,
            "checkpoints": cfg.checkpoints, "seeds": cfg.seeds, "reference_row": cfg.reference_row,
            "target_accuracy": target, "target_trivial": target is not None and initial is not None and target <= initial,
            "rows": rows}


def _pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if mean is None:
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def markdown(summary: dict[str, Any]) -> str:
    """The table file: accuracy and KL by compute mark, then compute and wall-clock to full OPD's accuracy."""
    n, budget = summary["checkpoints"], summary["budget_flops"]
    heads = ["0"] + [f"{100 * i // n}% ({format_flops(budget * i / n)})" for i in range(1, n + 1)]
    rows = summary["rows"]
    lines = [f"# Truncation experiment `{summary['name']}`", "",
             f"Command: `{summary['command']}`. Budget {format_flops(budget)} per run (generation + teacher + learner, "
             f"protocol/compute.py), held-out evaluation at {n} compute marks, seeds {summary['seeds']}, mean ± std "
             "over seeds." + (f" **Preset `{summary['preset']}`**: only the rows below." if summary.get("preset") else ""),
             ""]
    for title, key, scale, digits in (("Held-out greedy exact match (%)", "accuracy", 100.0, 1),
                                      ("Held-out full-length reverse KL to the teacher (nats/token)", "kl", 1.0, 3)):
        lines += [f"## {title}", "", "| row | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
        for row in rows:
            if not row["seeds"]:
                continue
            cells = [_pm(c[key], c[f"{key}_std"], scale, digits) for c in row["checkpoints"]]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    target = summary["target_accuracy"]
    lines += [f"## To reach `{summary['reference_row']}`'s final accuracy"
              + (f" ({100 * target:.1f}%)" if target is not None else " (no reference row ran)"), "",
              "| row | compute | vs reference | wall-clock (s) | seeds | learner steps at budget | wall-clock at budget (s) "
              "| student tokens generated | saved by truncation (probe est., % of full) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if not row["seeds"]:
            continue
        r = row["reach"]
        got = f"{r.get('reached', 0)}/{r.get('of', 0)}"
        lines.append("| " + " | ".join([
            row["label"], format_flops(r["flops"]) if r.get("flops") is not None else "not reached",
            f"{r['vs_reference']:.2f}x" if r.get("vs_reference") else "-",
            f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "-", got,
            f"{row['steps']:.0f}" if row["steps"] is not None else "-",
            f"{row['wall_s']:.0f}" if row["wall_s"] is not None else "-",
            f"{row['generated']:.0f}" if row["generated"] is not None else "-",
            f"{100 * row['saved_fraction']:.0f}%" if row["saved_fraction"] is not None else "-"]) + " |")
    if summary.get("target_trivial"):
        lines += ["", f"The student already had `{summary['reference_row']}`'s final accuracy before training: this "
                  "table says nothing here; compare the KL."]
    notes = [f"- `{row['name']}` skipped: {row['skipped']}" for row in rows if row["skipped"]]
    notes += [f"- `{row['name']}` seed {seed} failed: {reason.splitlines()[0]}" for row in rows
              for seed, reason in row["failed"].items()]
    if notes:
        lines += ["", "Not run:", *notes]
    lines += ["", "vs reference: the reference row's compute to reach its own final accuracy divided by this row's "
              "(above 1: less compute). Resolution: one compute mark. Wall-clock counts from the learner's first "
              "published state (start-up left out); evaluation is outside the budget and the clock.", ""]
    return "\n".join(lines)


def write(results: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """table.md and results.json (the summary and every run record, timelines included)."""
    (results / "table.md").write_text(markdown(summary))
    (results / "results.json").write_text(json.dumps({"summary": summary, "runs": records}, indent=1) + "\n")
