"""Helpers for fault tests: the pipeline's roles as real processes (`opd actor|teacher|learner`), and the
numbers they leave behind (ledger, lineage, /metrics).

Each role runs in a session of its own (signals meant for the test runner do not reach it) and logs to
its own file, so a test can check what every role said.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from learner_streams import start

from opd.tiny import asset_paths
from protocol import ledger
from protocol.names import Names

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"


def pipeline_overrides(redis_url: str, names: Names, root: Path, tmp: Path, **extra: object) -> list[str]:
    """A small, fast pipeline on the tiny models; `extra` as ``{"learner.steps": 8}``."""
    paths = asset_paths(root)
    base: dict[str, object] = {
        "transport.redis_url": redis_url, "transport.namespace": names.namespace, "run.tiny_assets": "null",
        "run.warm_cache": "null", "actor.model_dir": paths.student_dir, "actor.prompts_file": paths.prompts_file,
        "actor.max_new_tokens": 8, "actor.weights_poll_s": 0.2, "actor.device": "cpu",
        "teacher.model_dir": paths.teacher_dir, "teacher.cache_dir": tmp / "cache", "teacher.batch_size": 4,
        "teacher.device": "cpu", "learner.model_dir": paths.student_dir, "learner.workdir": tmp / "learner",
        "learner.device": "cpu", "learner.batch_size": 4, "learner.micro_batch_tokens": 256,
        "learner.eval.heldout_file": "''", "learner.checkpoint_every": 1000, "learner.read_timeout_s": 300,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@dataclass
class Role:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Pipeline:
    """Started roles, by name; `stop_all` ends whatever is still running (SIGTERM, then SIGKILL)."""

    roles: dict[str, Role] = field(default_factory=dict)

    def start(self, role: str, name: str, overrides: list[str], logs: Path) -> Role:
        cmd = [sys.executable, "-m", "opd.cli", role, "--config", str(CONFIG), "--id", name]
        for o in overrides:
            cmd += ["--set", o]
        r = Role(name, start(cmd, logs / f"{name}.log"), logs / f"{name}.log")
        self.roles[name] = r
        return r

    def failed(self) -> str | None:
        """The log tail of a role that exited with an error, if any."""
        for r in self.roles.values():
            if r.proc.poll() not in (None, 0):
                return f"{r.name} exited with {r.proc.returncode}:\n{r.log()[-4000:]}"
        return None

    def stop_all(self, timeout_s: float = 60.0) -> None:
        for r in self.roles.values():
            if r.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    r.proc.send_signal(signal.SIGCONT)  # a paused role cannot handle SIGTERM
                    r.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for r in self.roles.values():
            try:
                r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()


def wait_until(what: str, check: Callable[[], bool], pipeline: Pipeline, timeout_s: float = 300.0,
               poll_s: float = 0.1) -> None:
    """Poll `check` until true; fail naming `what` if a role dies or the generous guard runs out."""
    deadline = time.monotonic() + timeout_s
    while not check():
        bad = pipeline.failed()
        if bad is not None:
            raise AssertionError(f"while waiting for {what}: {bad}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {r.name}\n{r.log()[-1500:]}" for r in pipeline.roles.values())
            raise AssertionError(f"gave up waiting for {what}\n{tails}")
        time.sleep(poll_s)


def held_by(client: redis.Redis, names: Names, consumer: str) -> list[str]:
    """Entry ids of the rollout stream that `consumer` (a teacher) holds pending."""
    if not client.exists(names.rollouts):
        return []
    pending = client.xpending_range(names.rollouts, names.groups[names.rollouts], "-", "+", 1000, consumername=consumer)
    return [p["message_id"].decode() for p in pending]


def pause_while_holding(client: redis.Redis, names: Names, pipe: Pipeline, name: str) -> list[str]:
    """SIGSTOP the teacher at a moment it holds entries; returns them (retries until it catches one)."""
    proc = pipe.roles[name].proc
    held: list[str] = []

    def paused_holding() -> bool:
        nonlocal held
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)  # a command it sent just before the pause still executes: let it land
        held = held_by(client, names, name)
        if held:
            return True
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
        return False

    wait_until(f"{name} paused while holding entries", paused_holding, pipe, poll_s=0.0)
    return held


def metric(client: redis.Redis, names: Names, role_id: str, name: str) -> float | None:
    """One sample's value from a live role's /metrics (None while it is not registered or not answering)."""
    url = client.hget(names.key("endpoints"), role_id)
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url.decode(), timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@dataclass(frozen=True)
class Books:
    """A run's books from witnesses that do not read one another (issue 16, defect 4).

    `produced`: what the producers say they published: each actor counts its own entries in
    `<ns>:produced_by`, in the script that appends them (a SIGKILL cannot separate the two), plus what the test
    wrote by hand; no consumer ever writes it. `trained`: distinct ids in the learner's lineage files
    (`trained_ids*.jsonl` in its work dir; a journal replay lists a step's ids again, not new ones). `dropped`:
    the learner's own drop counter (`<ns>:count:dropped`). `dead_lettered`: the dead-letter stream's length.
    `queued`: the rollouts and scored streams' lengths (acknowledged entries are deleted, so this is what is
    undelivered or pending). Before, the check compared the ledger with itself, so "0 lost" held by construction.
    """

    produced: int
    trained: int
    dropped: int
    dead_lettered: int
    queued: int
    by_producer: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.produced - (self.trained + self.dropped + self.dead_lettered + self.queued)

    def __str__(self) -> str:
        return (f"produced {self.produced} (by producer: {self.by_producer}) vs trained {self.trained} + dropped "
                f"{self.dropped} + dead-lettered {self.dead_lettered} + queued {self.queued}: lost {self.lost}")


def lineage(learner_workdir: Path) -> list[dict[str, Any]]:
    """Every row of the learner's lineage files (rank 0's `trained_ids.jsonl` and any other rank's)."""
    return [json.loads(line) for path in sorted(learner_workdir.glob("trained_ids*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def read_books(client: redis.Redis, names: Names, learner_workdir: Path, *, written: int = 0) -> Books:
    """The independent books (see `Books`); `written`: entries the test put on a stream by hand, uncounted."""
    by_producer = {k.decode(): int(v) for k, v in client.hgetall(names.produced_by).items()}
    trained = {i for row in lineage(learner_workdir) for i in row["ids"]}
    return Books(produced=sum(by_producer.values()) + written, trained=len(trained),
                 dropped=int(client.get(names.dropped) or 0), dead_lettered=int(client.xlen(names.dead)),
                 queued=int(client.xlen(names.rollouts)) + int(client.xlen(names.scored)), by_producer=by_producer)


def assert_books_balance(books: Books) -> None:
    """produced (the producers' own count) == trained + dropped + dead-lettered + queued, or fail saying each."""
    if books.lost != 0:
        raise AssertionError(f"the books do not balance: {books}")


def assert_conserved_and_trained_once(client: redis.Redis, names: Names, learner_workdir: Path, *,
                                      written: int = 0) -> dict[str, int]:
    """The independent books balance (`Books`), the ledger agrees with them, and each trained id was trained once.

    `written`: entries the test wrote on a stream by hand, without a producer count (raw `XADD`). Returns the
    ledger's counts (plus `duplicates`, the copies the learner refused).
    """
    books = read_books(client, names, learner_workdir, written=written)
    assert_books_balance(books)
    audit = ledger.audit(client, names)  # counters + fields: terminal fields may have been rolled up
    assert audit.conserved, audit
    counts = audit.outcomes
    assert counts[ledger.PRODUCED] == 0 and books.queued == 0, (counts, str(books))
    assert counts[ledger.DROPPED] == books.dropped, (counts, str(books))
    assert counts[ledger.DEAD] <= books.dead_lettered, (counts, str(books))  # a letter without an id has no outcome
    rows = lineage(learner_workdir)
    trained = [i for row in rows if not row["replayed"] for i in row["ids"]]
    assert len(trained) == len(set(trained)), "a prefix was trained twice"
    # A replay retrains a journaled step with the same ids (not a second training); a learner SIGKILLed between
    # committing a step and writing its lineage row has only the replay's row for it. So: every trained id in
    # some row, each id in one step only.
    steps_of: dict[str, set[int]] = {}
    for row in rows:
        for i in row["ids"]:
            steps_of.setdefault(i, set()).add(row["step"])
    assert not [i for i, steps in steps_of.items() if len(steps) > 1], "a prefix was trained in two steps"
    in_ledger = {k.decode() for k, v in client.hgetall(names.ledger).items() if v == ledger.TRAINED.encode()}
    assert in_ledger <= set(steps_of) and len(steps_of) == counts[ledger.TRAINED], (len(steps_of), counts)
    result = {**counts, "duplicates": ledger.duplicates(client, names)}
    record_figures(books, duplicates=result["duplicates"], replayed=sum(len(r["ids"]) for r in rows if r["replayed"]))
    return result


FIGURES_ENV = "OPD_FAULT_FIGURES"
"""A JSONL file each conservation check appends its books to (scripts/fault-figures.py sets it and writes the
table of docs/reliability.md from it); unset, nothing is written."""


def record_figures(books: Books, *, duplicates: int, replayed: int) -> None:
    """Append the calling test's independent books: its id, what it injected (its docstring's first line)."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    row = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], "fault": _calling_test_doc(),
           "produced": books.produced, "trained": books.trained, "dropped": books.dropped,
           "dead_lettered": books.dead_lettered, "queued": books.queued, "duplicates_refused": duplicates,
           "replayed": replayed, "lost": books.lost}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _calling_test_doc() -> str:
    """The first line of the docstring of the test function up the stack (else its name in words)."""
    frame = sys._getframe(1)
    while frame is not None and not frame.f_code.co_name.startswith("test_"):
        frame = frame.f_back
    if frame is None:
        return "?"
    name = frame.f_code.co_name
    doc = getattr(frame.f_globals.get(name), "__doc__", None) or name.removeprefix("test_").replace("_", " ")
    return doc.strip().split("\n")[0]


class RedisServer:
    """A redis-server of the test's own (AOF on, fsync everysec: the default), to kill and restart.

    `kill` is SIGKILL (no shutdown save); `start` (again) on the same port and data dir loads the AOF.
    """

    def __init__(self, data_dir: Path, port: int, *extra: str) -> None:
        self.data_dir, self.port, self.extra = data_dir, port, extra
        self.proc: subprocess.Popen[bytes] | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server not found on PATH (apt-get install redis-server)"
        auth = ["--requirepass", password] if password else []
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir), "--appendonly",
             "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
             "--logfile", str(self.data_dir / "redis.log"), *auth, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, password=password)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start:\n{self.log()[-2000:]}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        path = self.data_dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""
