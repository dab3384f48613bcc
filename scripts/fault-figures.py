#!/usr/bin/env python3
"""Run the fault suite and write its books as a table: faults injected, prefixes produced, accounted for, lost.

    python scripts/fault-figures.py                 # run, print the table
    python scripts/fault-figures.py --write         # ... and put it into docs/reliability.md
    python scripts/fault-figures.py --from F.jsonl  # the table of a run made with OPD_FAULT_FIGURES=F.jsonl
                                                    # (e.g. the whole suite: `OPD_FAULT_FIGURES=F.jsonl pytest`)

Every fault test ends with the same conservation check (tests/integration/roles.py
`assert_conserved_and_trained_once`); with OPD_FAULT_FIGURES set, that check appends the test's books to a
JSONL file. The figures are what the real runs left in Redis and in the learner's lineage, not a summary of
the assertions: `lost` is produced minus (trained + dropped + dead-lettered + still queued).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- fault-figures:begin -->", "<!-- fault-figures:end -->"
SUITE = ("test_fault_*.py", "test_load_*.py", "test_bad_input.py", "test_security.py")
COLUMNS = ("produced", "trained", "dropped", "dead_lettered", "queued", "duplicates_refused", "replayed", "lost")


def run_suite(figures: Path, extra: list[str]) -> int:
    """The fault tests under pytest, each conservation check appending to `figures`; pytest's exit code."""
    files = sorted({str(p.relative_to(REPO)) for pat in SUITE for p in (REPO / "tests" / "integration").glob(pat)})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *extra]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=REPO, env={**os.environ, "OPD_FAULT_FIGURES": str(figures)})


def table(rows: list[dict], *, command: str, note: str) -> str:
    """The Markdown block: one line per conservation check, then the totals."""
    head = ["test", "what it does (its docstring)", *COLUMNS]
    lines = [f"Command: `{command}` ({note}{os.cpu_count()} cores, Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d')}).", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        test = r["test"].split("::", 1)[-1]
        lines.append(f"| `{test}` | {r['fault']} | " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    totals = {c: sum(r[c] for r in rows) for c in COLUMNS}
    lines.append(f"| **all {len(rows)} runs** | | " + " | ".join(f"**{totals[c]}**" for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_doc(block: str) -> None:
    """Replace the block between the markers in docs/reliability.md (appended with a heading if absent)."""
    text = DOC.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN) + len(BEGIN)] + "\n" + block + text[text.index(END):]
    else:
        text = text.rstrip("\n") + "\n\n## The fault suite's books\n\n" + BEGIN + "\n" + block + END + "\n"
    DOC.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="put the table into docs/reliability.md")
    ap.add_argument("--from", dest="source", type=Path, metavar="JSONL",
                    help="render the books a run with OPD_FAULT_FIGURES=JSONL left, instead of running the suite")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (e.g. -k sigkill)")
    args = ap.parse_args()
    command = "python scripts/fault-figures.py" + (" --write" if args.write else "")
    start, rc = time.monotonic(), 0
    if args.source is not None:
        command = f"OPD_FAULT_FIGURES={args.source.name} python -m pytest (the whole suite); " + command + \
            f" --from {args.source.name}"
        rows = [json.loads(line) for line in args.source.read_text().splitlines()]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            figures = Path(tmp) / "figures.jsonl"
            rc = run_suite(figures, args.pytest_args)
            rows = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    if not rows:
        print("no conservation check ran", file=sys.stderr)
        return rc or 1
    note = "" if args.source is not None else f"exit {rc}, {time.monotonic() - start:.0f} s, "
    block = table(rows, command=command, note=note)
    print(block)
    if args.write:
        write_doc(block)
        print(f"written to {DOC.relative_to(REPO)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
