"""`opd experiment report RESULTS.json`: the table again from a stored results.json, with today's statistics.

WHY: the intervals (opd/experiment/stats.py) are computed from the run records alone, so an experiment run
before they existed (docs/results/*/results.json) can be re-read without rerunning anything. Records from
before the cache was charged are marked so (`charge_cache` absent: those runs got cache hits for free), and
records without per-problem results are resampled over seeds only; the table says both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEXT = "rewrite an experiment's table from its results.json with bootstrap intervals (nothing is rerun)"


def add_report_parser(exp_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `experiment report` under `opd experiment`."""
    p = exp_sub.add_parser("report", help=TEXT, description=TEXT + ".")
    p.add_argument("results", type=Path, help="a results.json that `opd experiment run` wrote")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap replicates (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default %(default)s)")
    p.add_argument("--out", type=Path, help="write the Markdown here (default: print it)")


def run_report(args: argparse.Namespace) -> int:
    """Load, aggregate, print or write; exit code 2 on a file that is not an experiment's results.json."""
    from opd.experiment.config import ExperimentConfig
    from opd.experiment.report import aggregate, markdown

    try:
        data = json.loads(args.results.read_text())
        summary, records = data["summary"], data["runs"]
        cfg = ExperimentConfig.model_validate({
            "name": summary["name"], "budget_flops": summary["budget_flops"], "checkpoints": summary["checkpoints"],
            "seeds": summary["seeds"], "reference_row": summary["reference_row"],
            "charge_cache": any(r.get("charge_cache") for r in records),
            "bootstrap": {"resamples": args.resamples, "seed": args.seed},
            "rows": [{"name": r["name"], "label": r["label"], "kind": r["kind"]} for r in summary["rows"]]})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"opd experiment report: {args.results}: not an experiment's results.json ({exc})", file=sys.stderr)
        return 2
    command = f"opd experiment report {args.results} --resamples {args.resamples} --seed {args.seed}"
    text = markdown(aggregate(cfg, records, preset=summary.get("preset"), command=f"{summary['command']}`; "
                              f"intervals: `{command}"))
    if args.out is not None:
        args.out.write_text(text)
    else:
        print(text)
    return 0
