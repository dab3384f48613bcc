"""`opd experiment positions`: where along the answer each row's student ended up close to the teacher.

The experiment's table gives one full-length KL per checkpoint. A truncated schedule trains early positions
only, so the question behind a bad row is *which* positions got worse: those it trained (the signal was
wrong) or those it never trained (shared weights moved under them). This re-evaluates the checkpoints an
experiment kept (`keep_weights: true`, the default) with the held-out KL split into buckets of response
positions, averages over seeds, and writes `positions.md` and `positions.png` beside the table.
It re-reads what `opd experiment run` wrote; it trains nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
from pathlib import Path
from typing import Any

DEFAULT_EDGES = (0, 40, 100, 200)
TEXT = "held-out reverse KL by response position of each row's kept checkpoints (positions.md, positions.png)"


def add_positions_parser(exp_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `experiment positions` under `opd experiment`."""
    p = add_reader_parser(exp_sub, "positions", TEXT)
    p.add_argument("--edges", default=",".join(map(str, DEFAULT_EDGES)),
                   help="bucket starts in response tokens, comma-separated (default %(default)s; the last is open)")
    p.add_argument("--mark", type=int, default=-1, help="which compute mark per run (default: the last)")


def add_reader_parser(exp_sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """A subcommand that reads what `opd experiment run` wrote: --config and --quick/--preset say which run."""
    p = exp_sub.add_parser(name, help=text, description=text + ". Run after `opd experiment run` with the same "
                           "--config and --quick/--preset.")
    p.add_argument("--config", "-c", required=True, help="the experiment YAML the run used")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the run was --quick")
    which.add_argument("--preset", metavar="NAME", help="the run's --preset")
    return p


def run_positions(args: argparse.Namespace) -> int:
    """Evaluate, aggregate, write; returns the exit code (2 when the run left nothing to evaluate)."""
    from opd.experiment.config import load_experiment
    from opd.experiment.runner import pipeline_config, plan
    from opd.experiment.suite import evaluator_for
    from protocol.vocab import load_tokenizer, shared_vocab_size

    edges = parse_edges(args.edges)
    preset = "quick" if args.quick else args.preset
    cfg = load_experiment(args.config, preset=preset)
    results = Path(cfg.out_dir) / cfg.name
    path = results / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: run `opd experiment run` with this --config and preset first")
    runs = [r for r in json.loads(path.read_text())["runs"] if r["status"] == "ok" and len(r["checkpoints"]) > 1]
    vocab = shared_vocab_size(load_tokenizer(str(cfg.path("student_dir"))))
    evaluator = evaluator_for(cfg, pipeline_config(cfg, plan(cfg, results)[0], vocab))
    rows: dict[str, dict[str, Any]] = {"start": {"label": "start (before training)", "runs": [
        _measure(evaluator, str(cfg.path("student_dir")), edges)]}}
    for run in runs:
        mark = run["checkpoints"][args.mark]
        if not Path(mark["weights"]).exists():
            print(f"{run['row']} seed {run['seed']}: {mark['weights']} is gone (keep_weights: false?); skipped")
            continue
        print(f"{run['row']} seed {run['seed']}: checkpoint {mark['index']} (learner step {mark['step']})", flush=True)
        rows.setdefault(run["row"], {"label": run.get("label") or run["row"], "runs": []})
        rows[run["row"]]["runs"].append(_measure(evaluator, mark["weights"], edges))
    if len(rows) == 1:
        print(f"no kept checkpoints in {results}")
        return 2
    command = f"opd experiment positions --config {shlex.quote(str(args.config))}" + (
        " --quick" if args.quick else (f" --preset {shlex.quote(preset)}" if preset else ""))
    text = _markdown(rows, edges, command)
    (results / "positions.md").write_text(text)
    _plot(rows, edges, results / "positions.png", cfg.name)
    print(text + f"\nwritten: {results / 'positions.md'}, {results / 'positions.png'}")
    return 0


def _measure(evaluator: Any, model_dir: str, edges: tuple[int, ...]) -> list[float]:
    result = evaluator.reverse_kl(evaluator.load_student(model_dir), position_edges=edges)
    return [k if n else float("nan") for k, n in zip(result.kl_by_position or [], result.tokens_by_position or [],
                                                     strict=True)]


def parse_edges(text: str) -> tuple[int, ...]:
    """`--edges 0,40,100`: bucket starts in response tokens (also `opd experiment premise`'s)."""
    edges = tuple(int(x) for x in text.split(","))
    if list(edges) != sorted(set(edges)) or edges[0] != 0:
        raise ValueError(f"--edges {text}: increasing, distinct, starting at 0")
    return edges


def bucket_names(edges: tuple[int, ...]) -> list[str]:
    """`0-39`, `40-99`, ..., `200+` for edges (0, 40, 100, 200)."""
    return [f"{a}-{b - 1}" for a, b in itertools.pairwise(edges)] + [f"{edges[-1]}+"]


def _markdown(rows: dict[str, dict[str, Any]], edges: tuple[int, ...], command: str) -> str:
    import numpy as np

    heads = bucket_names(edges)
    lines = ["# Held-out reverse KL by response position (nats/token)", "",
             f"Command: `{command}`. Each row's last kept checkpoint, the experiment's held-out KL prompts and "
             "sampling seed; mean ± std over seeds. Positions count response tokens (0 = the first answer token).",
             "", "| row | seeds | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
    for row in rows.values():
        kl = np.array(row["runs"], dtype=float)
        mean, std = np.nanmean(kl, 0), np.nanstd(kl, 0)
        cells = [f"{m:.3f} ± {s:.3f}" if len(kl) > 1 else f"{m:.3f}" for m, s in zip(mean, std, strict=True)]
        lines.append(f"| {row['label']} | {len(kl)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: dict[str, dict[str, Any]], edges: tuple[int, ...], out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5))
    xs = np.arange(len(edges))
    for row in rows.values():
        kl = np.nanmean(np.array(row["runs"], dtype=float), 0)
        ax.plot(xs, kl, marker="o", linestyle="--" if row is rows["start"] else "-", label=row["label"])
    ax.set_xticks(xs, bucket_names(edges))
    ax.set_xlabel("response position (tokens)")
    ax.set_ylabel("reverse KL to teacher (nats/token)")
    ax.set_title(f"{name}: where along the answer each student is close to the teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
