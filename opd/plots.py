"""A PNG of a run: loss and sampled reverse KL per step, held-out reverse KL at each evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_run(history: list[dict[str, Any]], evals: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in history]
    axes[0].plot(steps, [r["reverse_kl"] for r in history], label="sampled reverse KL (train batch)")
    axes[0].plot(steps, [r["loss"] for r in history], label="loss", alpha=0.6)
    axes[0].set_xlabel("learner step")
    axes[0].legend()
    axes[0].set_title("training")
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["reverse_kl"] for r in evals], marker="o")
    axes[1].set_xlabel("learner step")
    axes[1].set_ylabel("nats / token")
    axes[1].set_title("held-out full-length reverse KL(student || teacher)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
