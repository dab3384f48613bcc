"""Watching one pipeline run from outside: compute spent, the horizon, and weights kept at compute marks.

The runner starts a `Watcher` thread next to `opd up`'s machinery. It polls the run stats every role adds
its FLOPs to (protocol/compute.py) and the learner's published state, and:
- keeps a timeline (seconds, FLOPs by part, learner step, the schedule's horizon) for the plots;
- when the FLOPs spent first reach a compute mark (budget x i / checkpoints), copies the newest published
  weights aside, so that evaluation (afterwards, in the runner's process) costs the run nothing.

WHY copy at the mark rather than evaluate there: evaluation would compete with the run for the CPU and
charge nothing to the budget only on paper; a copy takes milliseconds. The weights copied are the newest the
learner published when the mark was seen, and the FLOPs recorded are those spent by then (at or just past the
mark: everything generated or scored but not yet trained is charged too, which is what it cost).

Wall-clock counts from the learner's first published state (the models are loaded and it waits for data),
so process start-up, the same for every row, is left out.
"""

from __future__ import annotations

import random
import shutil
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.config import OPDConfig
from protocol import ledger
from protocol.compute import ComputeTally
from protocol.names import Names
from protocol.runtime import latest_weights
from protocol.state import LearnerState, read_state

TIMELINE_EVERY_S = 1.0
HORIZON_DRAWS = 16  # a random schedule's horizon is plotted as its mean over this many draws


@dataclass
class Mark:
    """Weights kept at a compute mark."""

    index: int  # 1..checkpoints
    mark_flops: float  # the nominal mark
    flops: dict[str, float]  # spent when it was seen, by part (ComputeTally.as_dict)
    wall_s: float
    step: int
    version: int
    weights: str


@dataclass
class WatchResult:
    marks: list[Mark]
    timeline: list[dict[str, Any]]
    stats: dict[str, float]  # the run stats at the end
    wall_s: float  # from the learner's first state to the end of the run
    steps: int = 0
    missed: list[float] = field(default_factory=list)  # marks the run stopped short of


class Watcher(threading.Thread):
    """Polls one run (its Redis URL must be set in `cfg` before `start()`)."""

    def __init__(self, cfg: OPDConfig, marks: list[float], out: Path, *, interval_s: float = 0.25,
                 on_poll: Any = None) -> None:
        super().__init__(name="experiment-watcher", daemon=True)
        self.cfg, self.marks, self.out, self.interval_s, self.on_poll = cfg, sorted(marks), out, interval_s, on_poll
        self.names = Names(cfg.transport.namespace)
        self.schedule = cfg.actor.schedule.build(cfg.actor.max_new_tokens)
        self.kept: list[Mark] = []
        self.timeline: list[dict[str, Any]] = []
        self.ready_at: float | None = None
        self.last_sample = 0.0
        self.step = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            from protocol.streams import connect_role

            self._client = connect_role(self.cfg.transport)
        return self._client

    def run(self) -> None:
        try:
            while not self._halt.wait(self.interval_s):
                self.poll()
        except BaseException as exc:  # surfaced by finish(): a silent watcher would lose the checkpoints
            self.error = exc

    def seconds(self) -> float:
        return 0.0 if self.ready_at is None else time.monotonic() - self.ready_at

    def poll(self, *, final: bool = False) -> None:
        tally = ComputeTally.from_stats(ledger.stats(self.client(), self.names),
                                        charge_cache=self.cfg.learner.max_flops_charges_cache)  # as the learner counts
        state = read_state(self.client(), self.names)
        if isinstance(state, LearnerState):
            if self.ready_at is None:
                self.ready_at = time.monotonic()
            self.step = state.step
        now = time.monotonic()
        if final or now - self.last_sample >= TIMELINE_EVERY_S:
            self.last_sample = now
            self.timeline.append(self.sample(tally, state))
        while len(self.kept) < len(self.marks) and tally.total >= self.marks[len(self.kept)]:
            if not self.keep(tally):
                break  # nothing published yet: try again at the next poll
        if self.on_poll is not None:
            self.on_poll(tally, self.step)

    def sample(self, tally: ComputeTally, state: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"wall_s": round(self.seconds(), 3), **{f"flops_{k}": v for k, v in tally.as_dict().items()}}
        if isinstance(state, LearnerState):
            draws = [self.schedule.horizon(state, random.Random(i)) for i in range(HORIZON_DRAWS)]
            trained = [w.horizon_max for w in state.kl_windows if w.samples]
            row.update(step=state.step, version=state.version, horizon=statistics.fmean(draws),
                       trained_horizon_max=trained[-1] if trained else None, train_kl=state.reverse_kl)
        return row

    def keep(self, tally: ComputeTally) -> bool:
        """Copy the newest published weights for the next mark; False when there are none yet."""
        for _ in range(5):  # the learner may delete an old version while it is copied: take the newer one
            ann = latest_weights(self.client(), self.names)
            if ann is None:
                return False
            index = len(self.kept) + 1
            dest = self.out / f"c{index}"
            shutil.rmtree(dest, ignore_errors=True)
            try:
                shutil.copytree(ann.path, dest)
            except (FileNotFoundError, shutil.Error):
                continue
            self.kept.append(Mark(index=index, mark_flops=self.marks[index - 1], flops=tally.as_dict(),
                                  wall_s=round(self.seconds(), 3), step=ann.step, version=ann.version,
                                  weights=str(dest)))
            return True
        return False

    def halt(self) -> None:
        """Stop polling (idempotent; before the run's Redis goes away, so the thread never waits on a dead one)."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=30)

    def finish(self) -> WatchResult:
        """Stop polling, take a last look (the learner's final weights serve marks reached at the very end)."""
        self.halt()
        if self.error is not None:
            raise RuntimeError(f"the experiment's watcher failed: {self.error}") from self.error
        self.poll(final=True)
        stats = ledger.stats(self.client(), self.names)
        missed = self.marks[len(self.kept):]
        return WatchResult(marks=self.kept, timeline=self.timeline, stats=stats, wall_s=round(self.seconds(), 3),
                           steps=self.step, missed=missed)
