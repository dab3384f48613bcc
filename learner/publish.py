"""What the learner tells the others: its weights and its state.

Weights: the policy the actors sample from, as a bare HF dir ``root/v000123/`` (``publish_weights``), written
atomically like a checkpoint (``learner/modeldirs.py``: tmp dir + rename) with the modes a plain write would
have, so actors, SGLang servers and other users can read it; then announced (``protocol/runtime.py``). State:
the typed, versioned ``LearnerState`` (``protocol/state.py``) that admission control, truncation schedules and
``opd top`` read. ``Publisher`` does both for the learner's loop.

A full disk under the weights (``WriteFailed``, ``learner/checkpoint.py``) announces nothing: actors keep
the previous weights, which are untouched, and the next publication tries again. Once the learner is more
than ``max_staleness`` versions past the announced weights, everything the actors can sample is too stale
to train: ``Publisher.stalled`` then has the loop retry the publication (every ``PUBLISH_RETRY_S``) instead
of waiting for data that would only be dropped (and, after ``learner.read_timeout_s``, stop the run). ``Publisher.write_failed``
is where the learner says that a write failed, for weights and checkpoints alike: one ERROR line when
failures start, a reminder at most every ``FAILURE_REMIND_S``, one line when a write succeeds again.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import redis
import torch

from learner.checkpoint import WriteFailed
from learner.config import LearnerConfig
from learner.distributed import Distributed, TrainModel
from learner.modeldirs import (
    PretrainedModel,
    commit_dir,
    numbered_dirs,
    prune_older,
    remove_leftovers,
    require_int,
    tree_nbytes,
)
from learner.weightfiles import WeightWriter
from protocol import ledger
from protocol.files import write_error_reason
from protocol.messages import WeightsAnnouncement
from protocol.names import Names
from protocol.runtime import announce_weights, latest_weights
from protocol.state import LearnerState, publish_state
from protocol.telemetry import LearnerMetrics

_VERSION_RE = re.compile(r"^v(\d{6,})$")
FAILURE_REMIND_S = 60.0
PUBLISH_RETRY_S = 1.0
_WHAT_NEXT = {
    "checkpoint": "training goes on; the steps since the last good checkpoint stay in the Redis journal, so a restart "
                  "resumes from that checkpoint without losing them; the next checkpoint is tried as scheduled",
    "weights": "actors keep sampling the previous weights; the next publication tries again",
}

log = logging.getLogger(__name__)


def version_dir_name(version: int) -> str:
    return f"v{version:06d}"


def list_published(root: str | os.PathLike[str]) -> list[Path]:
    """Published weight dirs under ``root``, oldest version first."""
    return [path for _, path in numbered_dirs(Path(root), _VERSION_RE, marker=None)]


class SavesPretrained(Protocol):
    """A tokenizer (or processor): anything with HF's ``save_pretrained(dir)``."""

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any: ...


def publish_weights(
    model: PretrainedModel,
    root: str | os.PathLike[str],
    version: int,
    keep_last: int,
    *,
    tokenizer: SavesPretrained | None = None,
    durable: bool = False,
    writer: WeightWriter | None = None,
) -> tuple[Path, int]:
    """Write ``model`` as an HF dir ``root/v{version:06d}`` atomically; returns ``(path, nbytes)``.

    Not fsynced by default (``durable``): published weights are derived data, rewritten every step,
    and fsync was half of a small model's publication time. The rename still makes them atomic for
    readers, which is all a process crash needs; after a power loss the restarted learner re-publishes
    its version from the (fsynced) checkpoint before announcing anything.

    Actors ``from_pretrained`` the path after the announcement. Keeps this version and the
    ``keep_last - 1`` newest older ones; use ``keep_last >= 2`` so an actor still loading the previous
    version doesn't have it deleted underneath it. Re-publishing an existing version (after a learner
    restart) replaces it. ``nbytes`` is the size of all files in the dir.

    Pass ``tokenizer`` to ship it in the same dir: it is written *before* the rename, so no reader can
    see the weights without it (saving it into the published dir afterwards would race the actors).
    ``writer`` (the ``Publisher``'s, kept across versions) serialises only the tensors after its first write
    (``learner/weightfiles.py``).
    """
    version = require_int("version", version, 0)
    keep_last = require_int("keep_last", keep_last, 1)
    root = Path(root)
    name = version_dir_name(version)
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        (writer or WeightWriter()).write(model, tmp, tokenizer)
        nbytes = tree_nbytes(tmp)
        final = root / name
        commit_dir(tmp, final, durable=durable)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and write_error_reason(exc) != "other":  # the disk, not a bug
            published = list_published(root)
            raise WriteFailed("weights", root / name, exc, published[-1] if published else None) from exc
        raise
    remove_leftovers(root, "v")
    prune_older(numbered_dirs(root, _VERSION_RE, marker=None), version, keep_last)
    return final, nbytes


class FullWeights:
    """An HF model plus its gathered (unsharded) weights, saved as a plain HF directory (FSDP)."""

    def __init__(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self.module = module
        self.weights = weights

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any:
        return self.module.save_pretrained(save_directory, state_dict=self.weights, **kwargs)  # type: ignore[operator]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
        raise NotImplementedError("gathered weights are written, never loaded")


class Publisher:
    """What the learner tells actors, schedules and `opd top`: its weights (an HF dir, then an announcement)
    and its `LearnerState` (``protocol/state.py``). Rank 0 writes; under FSDP every rank takes part in
    gathering the weights."""

    def __init__(self, cfg: LearnerConfig, client: redis.Redis, names: Names, dist: Distributed,
                 metrics: LearnerMetrics, model: torch.nn.Module, train_model: TrainModel, tokenizer: SavesPretrained,
                 workdir: Path) -> None:
        self.cfg = cfg
        self.client = client
        self.names = names
        self.dist = dist
        self.metrics = metrics
        self.model = model
        self.train_model = train_model
        self.tokenizer = tokenizer
        self.workdir = workdir
        self.measured: dict[str, Any] = {}  # the latest measurements, republished with every state
        self.writer = WeightWriter()  # after the first publication, only the tensors are serialised
        self.failures: dict[str, WriteFailed] = {}  # what = "checkpoint" | "weights" -> the failure going on
        self._failing: dict[str, tuple[float, float, int]] = {}  # what -> (since, last line, failed writes)
        self.announced: int | None = None  # the version actors were last told of (None: not read yet)

    def stalled(self, version: int) -> bool:
        """Whether the weights cannot be published and the announced ones are too old for anything sampled with
        them to be trained; then waits `PUBLISH_RETRY_S` (the caller retries the publication). All ranks agree."""
        stuck = False
        if "weights" in self.failures:
            if self.announced is None:
                ann = latest_weights(self.client, self.names)
                self.announced = ann.version if ann is not None else 0
            stuck = version - self.announced > self.cfg.max_staleness
        if self.dist.enabled:
            stuck = bool(self.dist.max([float(stuck)])[0])
        if stuck:
            time.sleep(PUBLISH_RETRY_S)
        return stuck

    def write_failed(self, exc: WriteFailed) -> None:
        """Count a failed checkpoint or weights write and say it, rate-limited (see module docs)."""
        self.metrics.write_failures.labels(what=exc.what, reason=exc.reason).inc()
        self.failures[exc.what] = exc
        now = time.monotonic()
        since, last, n = self._failing.get(exc.what, (now, 0.0, 0))
        if n == 0 or now - last >= FAILURE_REMIND_S:
            last = now
            again = f" ({n + 1} failed {exc.what} writes in {now - since:.0f} s)" if n else ""
            log.error("%s%s: %s", exc, again, _WHAT_NEXT.get(exc.what, ""))
        self._failing[exc.what] = (since, last, n + 1)

    def write_succeeded(self, what: str, path: Path) -> None:
        """After failures: one line saying that writing works again."""
        self.failures.pop(what, None)
        failing = self._failing.pop(what, None)
        if failing is not None:
            log.warning("%s written again (%s) after %d failed writes in %.0f s", what, path, failing[2],
                        time.monotonic() - failing[0])

    def saveable(self) -> Any:
        """What checkpoint/publish write: the model itself, or (FSDP, a collective) its gathered weights."""
        if self.train_model.mode != "fsdp":
            return self.model
        return FullWeights(self.model, self.train_model.full_state_dict())

    def weights(self, *, version: int, step: int) -> None:
        """Write the weights as an HF dir and announce the version (rank 0; every rank gathers under FSDP)."""
        t0 = time.perf_counter()
        model = self.saveable()
        if not self.dist.is_main:
            return
        try:
            path, nbytes = publish_weights(model, self.workdir / "weights", version, self.cfg.keep_published,
                                           tokenizer=self.tokenizer, writer=self.writer)
        except WriteFailed as exc:  # nothing announced: actors keep the previous weights
            self.write_failed(exc)
            return
        self.write_succeeded("weights", path)
        announce_weights(self.client, self.names, WeightsAnnouncement(
            version=version, path=str(Path(path).resolve()), step=step, nbytes=nbytes))
        self.announced = version
        dt = time.perf_counter() - t0
        self.metrics.publish_seconds.set(dt)
        self.metrics.publish_bytes.inc(nbytes)
        self.metrics.policy_version.set(version)

    def state(self, *, version: int, step: int, **measured: Any) -> None:
        """Publish the learner's `LearnerState`: admission control, schedules and `opd top` read it.
        `measured` updates the measurements carried along (phase, loss, held-out KL, ...)."""
        if not self.dist.is_main:
            return
        self.measured.update(measured)
        # `retired` is read now, after the weights of `version` are published: actors admit new work
        # against it, so a slot freed by this step is only taken by work sampled with this step's weights.
        retired = sum(ledger.counts(self.client, self.names)[o] for o in ledger.TERMINAL)
        publish_state(self.client, self.names, LearnerState(
            version=version, step=step, batch_size=self.cfg.batch_size, max_staleness=self.cfg.max_staleness,
            ranks=self.dist.world_size, retired=retired, **self.measured,
        ))
