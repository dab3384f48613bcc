"""`opd experiment run`: its arguments (no heavy imports here, so `opd --help` stays instant) and its run."""

from __future__ import annotations

import argparse
import shlex
import sys

RUN_TEXT = ("run the truncation experiment: every row (schedule or loss; TRL's GKDTrainer as the peer baseline) and "
            "seed through the real pipeline at an equal compute budget in FLOPs, held-out accuracy and KL at compute "
            "marks; writes a Markdown table, a JSON of every number and plots")


def add_run_parser(exp_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `experiment run` under `opd experiment`."""
    p = exp_sub.add_parser("run", help=RUN_TEXT, description=RUN_TEXT + ". See docs/experiments.md.")
    p.add_argument("--config", "-c", required=True, help="experiment YAML (e.g. configs/experiment-truncation.yaml)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true",
                       help="the config's `quick` preset: fewer rows and seeds, a smaller budget (under 30 min on 2 "
                       "cores)")
    which.add_argument("--preset", metavar="NAME",
                       help="one of the config's `presets` (e.g. `loss`: the loss-stability rows beside TRL's)")
    p.add_argument("--resume", action="store_true", help="reuse runs a previous invocation finished (their run.json)")
    p.add_argument("--dry-run", action="store_true", help="validate every row's pipeline config, print the plan, exit")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")


def run_run(args: argparse.Namespace) -> int:
    """Load the experiment config and run it; returns the exit code (1 if a run failed)."""
    from opd.experiment.config import load_experiment
    from opd.experiment.suite import run_experiment

    preset = "quick" if args.quick else args.preset
    cfg = load_experiment(args.config, preset=preset)
    command = "opd experiment run --config " + shlex.quote(str(args.config))
    command += " --quick" if args.quick else (f" --preset {shlex.quote(preset)}" if preset else "")
    try:
        return run_experiment(cfg, command=command, preset=preset, resume=args.resume, dry_run=args.dry_run,
                              plain=args.no_progress)
    except FileNotFoundError as exc:
        print(f"opd experiment run: {exc}", file=sys.stderr)
        return 2
