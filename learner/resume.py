"""Resuming a learner: the newest checkpoint, then the step journal replayed after it.

A learner killed at any point (``SIGKILL`` included) and restarted loads the newest checkpoint
(``restore``), replays the journaled steps after it (``replay``; ``learner/journal.py``), and takes back at
once what it had read but not committed (``learner/inflight.py``): no acknowledged sample is lost, none is
trained twice.

Policy versions only move forward: the replayed state is the last committed step, which is at least the
last version announced (a step is committed before its weights are published). Should Redis have lost the
journal, the learner continues one version above the last announcement (``move_version_forward``), so
actors (which load only newer versions) follow it and no version number ever names two different sets of
weights.

A damaged newest checkpoint (a truncated safetensors file, garbage JSON, a missing file) stops the start with
one error naming the file, and the learner does not fall back to the previous checkpoint by itself. WHY: when
the newest checkpoint was written, the journal forgot the steps it holds, so the previous checkpoint plus the
journal is not the state the run reached; resuming from it would silently lose the training of those steps
(their samples are acknowledged and gone). The error names the previous checkpoint, so an operator who
accepts that loss moves the damaged one aside and restarts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import redis

from learner.checkpoint import CheckpointCorrupt, PretrainedModel, Stash, list_checkpoints, load_checkpoint
from learner.distributed import Distributed, TrainModel
from learner.journal import StepJournal, orphaned_journals
from learner.position_kl import PositionKL
from learner.summary import LearnerSummary
from protocol.messages import ScoredPrefix
from protocol.names import Names
from protocol.runtime import latest_weights
from protocol.state import LearnerState, read_state

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ReplayState(Protocol):
    """What replaying the journal reads and moves on (``learner.loop.Learner`` has it): the loop is never
    imported here, so the arrows point one way (loop -> phase) and replay can be driven without a loop."""

    step: int
    version: int
    dist: Distributed
    client: redis.Redis
    names: Names
    journal: StepJournal
    summary: LearnerSummary

    def train_step(self, messages: list[ScoredPrefix]) -> Any:
        """One optimizer step on ``messages`` (advances ``step``)."""

    def record_lineage(self, ids: list[str], *, replayed: bool) -> None:
        """Which samples made the step just taken."""


@dataclass
class Restored:
    """What the newest checkpoint put into the model, and the optimizer state waiting for its optimizer.

    Why the optimizer state waits: under FSDP the optimizer must be built on the sharded parameters, and
    the weights must be loaded before sharding; so the checkpoint is read first (``restore``) and its
    optimizer state applied once the optimizer exists (``apply``).
    """

    path: Path | None = None
    step: int = 0
    version: int = 0
    optimizer_keys: str = "indices"
    optimizer: Stash = field(default_factory=Stash)
    scheduler: Stash = field(default_factory=Stash)

    def apply(self, train_model: TrainModel, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Load the stashed optimizer and LR scheduler state (nothing when no checkpoint was found)."""
        if self.path is None:
            return
        if self.optimizer_keys != train_model.optimizer_keys:
            raise ValueError(f"{self.path}: optimizer state keyed by parameter {self.optimizer_keys}, this run needs "
                             f"{train_model.optimizer_keys} (learner.fsdp differs from the run that wrote it)")
        try:
            train_model.load_optimizer_state(optimizer, self.optimizer.state)
        except Exception as exc:  # whatever the state holds, the error names the file
            raise CheckpointCorrupt(f"{self.path / 'optimizer.json'}: does not fit this model's optimizer "
                                    f"({type(exc).__name__}: {exc})") from None
        try:
            scheduler.load_state_dict(self.scheduler.state)
        except Exception as exc:  # whatever the state holds, the error names the file
            raise CheckpointCorrupt(f"{self.path / 'scheduler.json'}: does not fit this run's LR scheduler "
                                    f"({type(exc).__name__}: {exc})") from None
        log.info("resumed from %s at step %d, policy v%d", self.path, self.step, self.version)


def restore(model: PretrainedModel, root: Path) -> Restored:
    """The newest complete checkpoint under ``root`` loaded into ``model`` (in place); step 0 if there is none.

    A damaged one raises `CheckpointCorrupt` naming the file and the previous checkpoint (module docs: why no
    automatic fallback)."""
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        return Restored()
    ckpt = checkpoints[-1]
    restored = Restored(path=ckpt)
    try:
        meta = load_checkpoint(ckpt, model, restored.optimizer, restored.scheduler)
    except CheckpointCorrupt as exc:
        previous = (f"the previous checkpoint is {checkpoints[-2]}, but resuming from it would lose the training of "
                    f"the steps after it (the journal no longer holds them): to accept that, move {ckpt} aside"
                    if len(checkpoints) > 1 else f"there is no older checkpoint: move {ckpt} aside to start afresh")
        raise CheckpointCorrupt(f"cannot resume from checkpoint {ckpt}: {exc}; {previous}") from None
    restored.step, restored.version = int(meta["step"]), int(meta["policy_version"])
    restored.optimizer_keys = meta.extra.get("optimizer_keys", "indices")
    return restored


def replay(learner: ReplayState) -> None:
    """Re-run the journaled steps after the restored checkpoint: the state at the last committed step."""
    after = learner.step
    dist = learner.dist
    orphans = orphaned_journals(learner.client, learner.names, dist.world_size)
    if orphans:
        raise ValueError(f"the journals of ranks {sorted(orphans)} hold {sum(orphans.values())} committed samples that "
                         f"only those ranks can replay: restart with {max(orphans) + 1} ranks (this run has "
                         f"{dist.world_size})")
    steps = learner.journal.load(after_step=after)
    last, version = (steps[-1].step, steps[-1].version) if steps else (after, learner.version)
    if dist.enabled:  # ranks may differ by the step one of them was killed before committing
        last, version = (int(v) for v in dist.max([last, version]))
    by_step = {js.step: js for js in steps}
    for s in range(after + 1, last + 1):
        js = by_step.get(s)
        learner.train_step(js.messages if js is not None else [])
        if js is None:  # this rank died before committing its share: it is still pending, trained later
            learner.journal.commit(learner.step, learner.version, [])
        learner.record_lineage([m.id for m in js.messages] if js is not None else [], replayed=True)
        learner.summary.replayed_steps += 1
    if last > after:
        learner.version = max(learner.version, version)
        log.info("replayed %d journaled steps after the checkpoint: now at step %d, policy v%d",
                 last - after, learner.step, learner.version)


def move_version_forward(client: redis.Redis, names: Names, version: int) -> int:
    """``version``, or one above the last announced version if that is newer (the journal was lost)."""
    ann = latest_weights(client, names)
    if ann is not None and ann.version > version:
        log.warning("weights v%d were announced but the restored state is v%d (the journal was lost?): "
                    "continuing as v%d so actors, which load only newer versions, follow", ann.version,
                    version, ann.version + 1)
        return ann.version + 1
    return version


def resume_measurements(client: redis.Redis, names: Names, position_kl: PositionKL, *, step: int,
                        bucket_tokens: int) -> dict[str, Any]:
    """A restarted learner takes back the KL windows it had published, up to the step it resumed at, so the
    adaptive schedule does not start over (a fresh run, at step 0, starts with none). Returns the
    measurements to publish again."""
    state = read_state(client, names) if step > 0 else None
    if isinstance(state, LearnerState) and state.bucket_tokens == bucket_tokens:
        position_kl.resume(state.kl_windows, through_step=step)
        return position_kl.published()
    return {}
