"""The experiment's figures: accuracy and KL against compute and against wall-clock; the horizon over training.

One line per row (mean over seeds at each compute mark, the band its bootstrap interval: stats.py); the horizon
figure shows each OPD run's horizon (what its schedule gives at the learner's state, a random schedule's
mean) against the FLOPs spent, one colour per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(summary: dict[str, Any], out: Path) -> Path:
    """curves.png: 2 x 2 panels (accuracy, KL) x (FLOPs, wall-clock)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [(axes[0][0], "flops", "accuracy"), (axes[0][1], "wall_s", "accuracy"),
              (axes[1][0], "flops", "kl"), (axes[1][1], "wall_s", "kl")]
    for ax, x_key, y_key in panels:
        for row in summary["rows"]:
            points = [c for c in row["checkpoints"] if c[y_key] is not None and c[x_key] is not None]
            if not points:
                continue
            xs = [c[x_key] for c in points]
            ys = [c[y_key] * (100 if y_key == "accuracy" else 1) for c in points]
            scale = 100 if y_key == "accuracy" else 1
            band = [c.get(f"{y_key}_ci") or [c[y_key], c[y_key]] for c in points]
            style = "--" if row["kind"] == "trl" else "-"
            (line,) = ax.plot(xs, ys, style, marker="o", label=row["label"])
            ax.fill_between(xs, [b[0] * scale for b in band], [b[1] * scale for b in band], color=line.get_color(),
                            alpha=0.12)
        ax.set_xlabel("FLOPs spent" if x_key == "flops" else "wall-clock (s, from the learner's first state)")
        ax.set_ylabel("greedy exact match (%)" if y_key == "accuracy" else "reverse KL to teacher (nats/token)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{summary['name']}: held-out accuracy and KL (mean over seeds {summary['seeds']}, band: 95% bootstrap interval)")
    fig.tight_layout()
    return _save(fig, plt, out)


def plot_horizon(summary: dict[str, Any], records: list[dict[str, Any]], out: Path) -> Path:
    """horizon.png: the schedule's horizon (tokens) against FLOPs spent, every OPD run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colours: dict[str, Any] = {}
    for rec in records:
        points = [p for p in rec.get("timeline") or [] if p.get("horizon") is not None]
        if rec.get("status") != "ok" or not points:
            continue
        label = None if rec["row"] in colours else rec["row"]
        (line,) = ax.plot([p["flops_total"] for p in points], [p["horizon"] for p in points], label=label,
                          color=colours.get(rec["row"]), drawstyle="steps-post", alpha=0.8)
        colours.setdefault(rec["row"], line.get_color())
    ax.set_xlabel("FLOPs spent")
    ax.set_ylabel("horizon (tokens)")
    ax.set_title("Truncation horizon over training (random: mean of its draws)")
    ax.grid(alpha=0.3)
    if colours:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, out)


def _save(fig: Any, plt: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
