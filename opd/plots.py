"""A PNG of a run: what the student learned and what truncation did, per learner step."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_run(history: list[dict[str, Any]], evals: list[dict[str, Any]], out: Path) -> Path:
    """Three panels: train-batch reverse KL, tokens per prefix (the horizon at work), held-out KL; a
    fourth, held-out greedy exact match, when the evaluation measured it (learner.eval.accuracy_prompts).

    The loss itself is not plotted: the policy-gradient surrogate's value is not a divergence (it
    scales with log pi), so the sampled reverse KL is the number to watch.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in evals if "accuracy" in r]
    fig, axes = plt.subplots(1, 4 if scored else 3, figsize=(20 if scored else 15, 4))
    steps = [r["step"] for r in history]
    axes[0].plot(steps, [r["reverse_kl"] for r in history], label="sampled-token estimate (the true KL)")
    if any("support_kl" in r for r in history):
        axes[0].plot(steps, [r.get("support_kl") for r in history], label="the loss's top-k support (a lower bound)")
        axes[0].legend()
    axes[0].set_title("reverse KL on training prefixes")
    axes[0].set_ylabel("nats / token")
    per_prefix = [r["tokens"] / r["samples"] if r.get("samples") else None for r in history]
    axes[1].plot(steps, per_prefix)
    axes[1].set_title("response tokens per trained prefix")
    if evals:
        axes[2].plot([r["step"] for r in evals], [r["reverse_kl"] for r in evals], marker="o")
    axes[2].set_title("held-out full-length reverse KL(student || teacher)")
    axes[2].set_ylabel("nats / token")
    if scored:
        axes[3].plot([r["step"] for r in scored], [100 * r["accuracy"] for r in scored], marker="o")
        axes[3].set_title(f"held-out greedy exact match ({scored[-1]['accuracy_prompts']} prompts)")
        axes[3].set_ylabel("% answered exactly (with EOS)")
        axes[3].set_ylim(0, 100)
    for ax in axes:
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
