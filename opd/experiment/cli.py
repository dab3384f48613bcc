"""`opd experiment ...` arguments (no heavy imports here, so `opd --help` stays instant) and their runs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "models" / "task"

ROLE_TEXT = {
    "teacher": "train the task's teacher (~1M params) on CPU and report its held-out greedy exact match",
    "student": "build the task's student (~0.1M params), warmed up on a little supervised data, and report "
               "its held-out greedy exact match (it should start weak but not at zero)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `experiment train-teacher|train-student` under the main parser."""
    exp = sub.add_parser("experiment", help="the truncation experiment: the task's teacher and student")
    exp_sub = exp.add_subparsers(dest="experiment_command", required=True)
    for role, text in ROLE_TEXT.items():
        p = exp_sub.add_parser(f"train-{role}", help=text, description=text + ". Deterministic given --seed and "
                               "--threads (the task's data split is a function of the seed).")
        p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                       help="directory for teacher/, student/, prompts.jsonl, heldout.jsonl, build_info.json "
                            "(default: the repository's models/task, which ships the models this command made)")
        p.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and batches")
        p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's; fewer for a quick look)")
        p.add_argument("--threads", type=int, default=2,
                       help="torch CPU threads (default 2; results are bit-identical only for the same count)")
        if role == "student":
            p.add_argument("--examples", type=int, help="supervised warm-up problems (default 256)")
        p.add_argument("--look-every", type=int, metavar="N",
                       help="every N steps, log greedy exact match on 32 held-out problems (same weights either way)")
        p.add_argument("--eval-problems", type=int, default=200, metavar="N",
                       help="held-out problems answered at the end (default: all 200)")
        p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    from opd.experiment.positions import add_positions_parser
    from opd.experiment.premise import add_premise_parser
    from opd.experiment.report_cli import add_report_parser
    from opd.experiment.run_cli import add_run_parser

    add_run_parser(exp_sub)
    add_positions_parser(exp_sub)
    add_premise_parser(exp_sub)
    add_report_parser(exp_sub)


def run(args: argparse.Namespace) -> int:
    """Run one `opd experiment` subcommand; returns the exit code."""
    if args.experiment_command == "run":
        from opd.experiment.run_cli import run_run

        return run_run(args)
    if args.experiment_command == "report":
        from opd.experiment.report_cli import run_report

        return run_report(args)
    if args.experiment_command == "positions":
        from opd.experiment.positions import run_positions

        return run_positions(args)
    if args.experiment_command == "premise":
        from opd.experiment.premise import run_premise

        return run_premise(args)
    role = args.experiment_command.removeprefix("train-")
    for name in ("steps", "threads", "examples", "look_every", "eval_problems"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"opd experiment: error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    from opd.experiment.build import build_role

    with _progress(role, args.no_progress) as progress:
        info = build_role(role, args.out, seed=args.seed, steps=args.steps, threads=args.threads,
                          examples=getattr(args, "examples", None), progress=progress, look_every=args.look_every,
                          log=progress.log, eval_problems=args.eval_problems)
    held = info["heldout"]
    assert isinstance(held, dict)
    print(f"{role}: {info['parameters'] / 1e6:.2f}M params, {info['train']['steps']} steps "  # type: ignore[index]
          f"in {info['train_seconds']:.0f} s on {args.threads} threads; held-out greedy exact match "
          f"{100 * held['accuracy']:.1f}% ({held['correct']}/{held['total']}, mean answer {held['mean_tokens']:.0f} "
          f"tokens, {100 * held['finished']:.0f}% finished) -> {args.out / role}")
    return 0


class _progress:
    """A rich progress bar (or a log line every 10%) fed by the trainer's (step, total, loss) callback."""

    def __init__(self, role: str, plain: bool) -> None:
        self.role, self.plain, self.bar, self.task = role, plain, None, None
        self.started = time.monotonic()

    def __enter__(self):  # type: ignore[no-untyped-def]
        if not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(f"training {self.role}", total=None, loss="-")
        return self

    def log(self, message: str) -> None:
        """A line above the bar (or a plain line)."""
        if self.bar is not None:
            self.bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def __call__(self, step: int, total: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, total=total, loss=f"{loss:.4f}")  # type: ignore[arg-type]
        elif step == total or step % max(total // 10, 1) == 0:
            print(f"{self.role}: step {step}/{total} loss {loss:.4f} ({time.monotonic() - self.started:.0f} s)",
                  flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
