"""What the experiment shows while it runs: which run, compute spent, evaluation; a rich bar or log lines.

Two bars on a terminal (all runs; the current run's FLOPs against the budget, with its learner step), plain
lines otherwise (`--no-progress`, or output to a file): one per 10% of a run's budget and one per event.
Written to stderr, so the runs' own output (redirected to their files) never mixes into it.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

from protocol.compute import ComputeTally, format_flops

TRL_LINE = re.compile(r"^trl: step (\d+): ([0-9.e+]+) FLOPs")


class Reporter:
    def __init__(self, *, total_runs: int, budget: float, plain: bool) -> None:
        self.total_runs, self.budget = total_runs, budget
        self.plain = plain or not sys.stderr.isatty()
        self.bar: Any = None
        self.run_name = ""
        self.started = time.monotonic()
        self.last_tenth = -1
        self.runs_task: Any = None
        self.run_task: Any = None

    def __enter__(self) -> Reporter:
        if not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                console=Console(stderr=True))
            self.bar.start()
            self.runs_task = self.bar.add_task("runs", total=self.total_runs, info="")
            self.run_task = self.bar.add_task("-", total=100, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def log(self, message: str) -> None:
        """A line above the bars (or a plain line on stderr)."""
        if self.bar is not None:
            self.bar.console.print(message, markup=False, highlight=False)
        else:
            print(f"[{time.monotonic() - self.started:6.0f}s] {message}", file=sys.stderr, flush=True)

    def start_run(self, name: str, index: int) -> None:
        self.run_name, self.last_tenth = name, -1
        self.log(f"run {index + 1}/{self.total_runs}: {name} (budget {format_flops(self.budget)})")
        if self.bar is not None:
            self.bar.update(self.run_task, description=name, completed=0, info="starting")

    def spent(self, tally: ComputeTally, step: int) -> None:
        """Compute spent by the current run (called by its watcher)."""
        share = min(tally.total / self.budget, 1.0)
        info = f"{format_flops(tally.total)} / {format_flops(self.budget)}, learner step {step}"
        if self.bar is not None:
            self.bar.update(self.run_task, completed=round(100 * share), info=info)
        elif int(share * 10) > self.last_tenth:
            self.last_tenth = int(share * 10)
            self.log(f"{self.run_name}: {info}")

    def trl_progress(self, log_path: Path) -> None:
        """The TRL run's progress, from the last step line its log holds."""
        try:
            lines = log_path.read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in reversed(lines):
            m = TRL_LINE.match(line)
            if m:
                self.spent(ComputeTally(learner=float(m.group(2))), int(m.group(1)))
                return

    def end_run(self, message: str) -> None:
        self.log(message)
        if self.bar is not None:
            self.bar.advance(self.runs_task)
            self.bar.update(self.run_task, info="done")
