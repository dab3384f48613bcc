"""Where a role's wall time goes: py-spy samples of its main thread, grouped by the function they are under.

WHY sampling and not timers in the roles: the roles stay as they are (no benchmark code on their hot path),
and py-spy's `--idle` samples include the time a thread spends blocked (a Redis round trip, a wait for data),
which is exactly the overhead this benchmark looks for. `Recorder` attaches to a running process
(`--nonblocking`: the target is never paused) and stops when told; `breakdown` turns the collapsed stacks
(`-f raw`) into fractions of the main thread's samples per category (the first category whose marker is
in the stack wins, so order them from specific to general) plus the fraction spent inside redis-py calls.
py-spy is optional (`pip install py-spy`): without it, `Recorder.start` returns None and the tables say n/a.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

# (label, frame marker) per role, first match wins. Markers are py-spy frame names ("Class.method (file:line)").
LEARNER = [
    ("train step", "Learner.train_step"),
    ("wait for data", "Intake.collect"),
    ("commit", "Learner.commit"),
    ("publish: write", "publish_weights"),
    ("publish: announce", "announce_weights"),
    ("state + stats", "Learner._record"),
    ("checkpoint + eval", "Learner.checkpoint"),
]
ACTOR = [
    ("admission", "Admission.acquire"),
    ("weights reload", "Actor.maybe_reload"),
    ("generate", ".generate ("),
    ("publish", "StreamQueue.publish"),
    ("back-pressure", "StreamQueue.wait_for_room"),
    ("stats", "Actor.account"),
]
TEACHER = [
    ("read", "StreamQueue.read"),
    ("score + cache", "Teacher.process"),
    ("forward", "StreamQueue.forward"),
    ("evict", "Teacher.maybe_evict"),
]
REDIS_MARKERS = ("redis/client.py", "redis/connection.py", "redis/commands/", "redis/_parsers")


def py_spy() -> str | None:
    """The py-spy binary: next to this Python (a venv), else on PATH."""
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


class Recorder:
    """`py-spy record --idle --nonblocking -f raw` of one process, from `start` until `stop`."""

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Recorder | None:
        binary = py_spy()
        if binary is None:
            return None
        self.proc = subprocess.Popen(
            [binary, "record", "--pid", str(self.pid), "--idle", "--nonblocking", "--threads", "-r", str(self.rate),
             "-f", "raw", "-o", str(self.out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> Path | None:
        """Stop sampling (SIGINT makes py-spy write what it has); the raw stacks, or None if it failed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.out if self.out.exists() and self.out.stat().st_size else None


def breakdown(raw: Path | None, categories: list[tuple[str, str]], main_marker: str) -> dict[str, float]:
    """Fractions of the main thread's samples per category (plus "other" and "in redis-py calls").

    The main thread is the one whose stacks contain `main_marker` (e.g. "Learner.run"); py-spy's raw lines
    are `frame;frame;... count`, outermost first.
    """
    if raw is None:
        return {}
    counts: Counter[str] = Counter()
    total = in_redis = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n_s = line.rpartition(" ")
        if main_marker not in stack or not n_s.isdigit():
            continue
        n = int(n_s)
        total += n
        counts[next((label for label, marker in categories if marker in stack), "other")] += n
        if any(m in stack for m in REDIS_MARKERS) and "Intake.collect" not in stack:
            in_redis += n
    if not total:
        return {}
    out = {label: counts[label] / total for label, _ in categories}
    out["other"] = counts["other"] / total
    out["in redis-py calls"] = in_redis / total
    out["samples"] = float(total)
    return out
