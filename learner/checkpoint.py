"""Crash-safe checkpoints of the learner (model, optimizer, LR scheduler, RNG), with no pickle anywhere.

Why no ``torch.save``/``torch.load``: both are pickle, and loading pickle runs arbitrary code. Checkpoints
may be copied around, so every file here is either safetensors (tensors) or JSON (everything else, see
``learner/statetree.py``).

Checkpoint layout (``root/step-000123/``)::

    model/                     HF ``save_pretrained`` dir (config.json, model.safetensors): actors and
                               ``from_pretrained`` can load it directly
    optimizer.json             optimizer.state_dict() with tensors replaced by references ...
    optimizer.safetensors      ... to these tensors (exp_avg, exp_avg_sq, step)
    scheduler.json             scheduler.state_dict() (+ scheduler.safetensors if it holds tensors)
    rng.json, rng.safetensors  python / numpy global RNG (JSON), torch CPU + CUDA RNG (uint8 tensors)
    meta.json                  step, policy_version, extra (e.g. stream positions), created_at
    COMPLETE                   written (and fsynced) last

Atomicity (``learner/modeldirs.py``): everything is written into ``root/.tmp-step-000123-XXXX``, fsynced,
then ``os.replace``d to ``root/step-000123`` and the parent directory fsynced. A crash at any point leaves
either the previous state or a ``.tmp-*`` directory, which ``latest_checkpoint`` ignores (it also requires
``COMPLETE``) and the next save removes. One writer per root is assumed (the single learner).

Published weights (``root/v000123/``) are written the same way by ``learner/publish.py``.

A full disk (or any other OS error) while writing raises ``WriteFailed`` naming the directory and the OS
error; the temporary directory is removed and the previous checkpoint was never touched, so it stays
loadable. What the learner then does is in ``learner/loop.py`` (it trains on; docs/reliability.md).

Loading refuses a damaged checkpoint with ``CheckpointCorrupt`` naming the file (a truncated
safetensors file, garbage JSON, a missing file) rather than a deep traceback; ``learner/resume.py`` says
why it does not fall back to an older checkpoint by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file

from learner.modeldirs import (
    PretrainedModel,
    commit_dir,
    numbered_dirs,
    prune_older,
    remove_leftovers,
    require_int,
    save_model,
)
from learner.statetree import decode_tree, read_json, save_tree, write_json
from protocol.files import write_error_reason

FORMAT_VERSION = 1
MODEL_DIR = "model"
COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"
_STEP_RE = re.compile(r"^step-(\d{6,})$")


class WriteFailed(OSError):
    """A checkpoint or published-weights directory could not be written (a full disk, an I/O error).

    ``what`` is ``checkpoint`` or ``weights``, ``reason`` the metric label of
    ``protocol.files.write_error_reason`` (``disk_full``, ``io_error``). Raised from the original error,
    after the temporary directory was removed: whatever was there before is untouched.
    """

    def __init__(self, what: str, path: Path, exc: BaseException, previous: Path | None) -> None:
        self.what, self.path, self.reason = what, path, write_error_reason(exc)
        kept = f"the previous one, {previous}, is intact" if previous is not None else "there is no previous one"
        super().__init__(f"{what} {path} not written ({type(exc).__name__}: {exc}); {kept}")


class CheckpointCorrupt(ValueError):
    """A complete-looking checkpoint that cannot be loaded; the message names the file and why."""


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure while loading ``path`` into a `CheckpointCorrupt` naming it (no deep traceback)."""
    try:
        yield
    except CheckpointCorrupt:
        raise
    except Exception as exc:
        raise CheckpointCorrupt(f"{path}: {type(exc).__name__}: {exc}") from None


def _load_tree(directory: Path, name: str) -> Any:
    """What ``statetree.save_tree`` wrote, every file read under `_reading` (never unpickled)."""
    tensor_file = directory / f"{name}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    if tensor_file.exists():
        with _reading(tensor_file):
            tensors = load_file(str(tensor_file), device="cpu")
    with _reading(directory / f"{name}.json"):
        return decode_tree(read_json(directory / f"{name}.json"), tensors)


class StatefulObject(Protocol):
    """An optimizer or LR scheduler."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class Stash:
    """A `StatefulObject` that only holds a state dict: what `load_checkpoint` fills before the optimizer
    exists (``learner/resume.py``), or a gathered FSDP optimizer state for `save_checkpoint`."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = state_dict


@dataclass(frozen=True)
class CheckpointMeta:
    """What ``load_checkpoint`` returns: the checkpoint's ``meta.json`` plus where it was read from."""

    path: Path
    step: int
    policy_version: int
    extra: dict[str, Any]
    created_at: float

    def __getitem__(self, key: str) -> Any:
        """``meta["step"]`` as well as ``meta.step``, for callers that treat meta as the meta.json dict."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


# ---------------------------------------------------------------------------------------------------
# model weights


def _load_model_weights(model: PretrainedModel, directory: Path) -> None:
    """Copy the HF safetensors weights in ``directory`` into ``model`` in place (no new model object, so
    the optimizer's references to the parameters stay valid)."""
    index = directory / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        with _reading(index):
            files = sorted(set(read_json(index)["weight_map"].values()))
    loaded: dict[str, torch.Tensor] = {}
    for filename in files:
        path = directory / filename
        if not path.is_file():
            raise CheckpointCorrupt(f"{path}: the checkpoint's weights file is missing")
        with _reading(path):
            loaded.update(load_file(str(path), device="cpu"))
    own = model.state_dict()
    unexpected = sorted(set(loaded) - set(own))
    if unexpected:
        raise ValueError(f"checkpoint has weights the model lacks: {unexpected[:5]}")
    # save_pretrained drops tied weights (e.g. lm_head tied to embed_tokens): a missing key is fine only if
    # it shares storage with a weight that was loaded.
    loaded_ptrs = {own[k].data_ptr() for k in loaded}
    missing = sorted(k for k in set(own) - set(loaded) if own[k].data_ptr() not in loaded_ptrs)
    if missing:
        raise ValueError(f"checkpoint lacks weights the model has: {missing[:5]}")
    with _reading(directory):  # e.g. a shape that does not fit this model
        model.load_state_dict(loaded, strict=False)


# ---------------------------------------------------------------------------------------------------
# RNG


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(cuda_states)} devices, this process sees "
                f"{torch.cuda.device_count()}; restoring the common prefix",
                stacklevel=3,
            )
        for device, device_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


# ---------------------------------------------------------------------------------------------------
# checkpoints


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temp dirs and dirs without COMPLETE ignored)."""
    return [path for _, path in numbered_dirs(Path(root), _STEP_RE, marker=COMPLETE_MARKER)]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    with _reading(path / META_FILE):
        meta = read_json(path / META_FILE)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported checkpoint format_version {meta.get('format_version')!r}")
        return CheckpointMeta(
            path=path,
            step=int(meta["step"]),
            policy_version=int(meta["policy_version"]),
            extra=dict(meta["extra"]),
            created_at=float(meta["created_at"]),
        )


def save_checkpoint(
    root: str | os.PathLike[str],
    model: PretrainedModel,
    optimizer: StatefulObject | None,
    scheduler: StatefulObject | None = None,
    *,
    step: int,
    policy_version: int,
    extra: dict[str, Any] | None = None,
    keep_last: int = 3,
) -> Path:
    """Write a complete checkpoint atomically to ``root/step-{step:06d}``; keep it and the ``keep_last - 1``
    newest older ones (see ``prune_older`` for newer leftovers).

    ``extra`` is any JSON-able dict (stream positions, ledger counters ...), returned by ``load_checkpoint``.
    An existing checkpoint of the same step is replaced. Returns the checkpoint path.
    """
    step = require_int("step", step, 0)
    policy_version = require_int("policy_version", policy_version, 0)
    keep_last = require_int("keep_last", keep_last, 1)
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-serializable (no NaN/inf): {exc}") from exc

    root = Path(root)
    name = step_dir_name(step)
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        _write_contents(tmp, model, optimizer, scheduler, step=step, policy_version=policy_version, extra=extra)
        final = root / name
        commit_dir(tmp, final)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and write_error_reason(exc) != "other":  # the disk, not a bug
            raise WriteFailed("checkpoint", root / name, exc, latest_checkpoint(root)) from exc
        raise

    remove_leftovers(root, "step-")
    prune_older(numbered_dirs(root, _STEP_RE, marker=COMPLETE_MARKER), step, keep_last)
    return final


def _write_contents(tmp: Path, model: PretrainedModel, optimizer: StatefulObject | None,
                    scheduler: StatefulObject | None, *, step: int, policy_version: int, extra: dict[str, Any]) -> None:
    """Every file of a checkpoint into ``tmp``, ``COMPLETE`` last (its presence means "all of the above")."""
    save_model(model, tmp / MODEL_DIR)
    if optimizer is not None:
        save_tree(optimizer.state_dict(), tmp, "optimizer")
    if scheduler is not None:
        save_tree(scheduler.state_dict(), tmp, "scheduler")
    save_tree(_rng_state(), tmp, "rng")
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "policy_version": policy_version,
        "extra": extra,
        "created_at": time.time(),
        "has_optimizer": optimizer is not None,
        "has_scheduler": scheduler is not None,
        "torch_version": torch.__version__,
    }
    write_json(tmp / META_FILE, meta)
    write_json(tmp / COMPLETE_MARKER, {"step": step})


def load_checkpoint(
    path: str | os.PathLike[str],
    model: PretrainedModel,
    optimizer: StatefulObject | None = None,
    scheduler: StatefulObject | None = None,
    *,
    restore_rng: bool = True,
) -> CheckpointMeta:
    """Restore model weights (in place), optimizer, scheduler and RNG state from a complete checkpoint.

    Never unpickles anything. Optimizer state tensors are cast/moved to their parameters' device by
    ``Optimizer.load_state_dict``, so a checkpoint written on GPU loads on CPU and vice versa.
    """
    meta = read_meta(path)
    with _reading(meta.path / META_FILE):
        raw = read_json(meta.path / META_FILE)
    if optimizer is not None and not raw.get("has_optimizer"):
        raise ValueError(f"{meta.path} has no optimizer state but an optimizer was passed")
    if scheduler is not None and not raw.get("has_scheduler"):
        raise ValueError(f"{meta.path} has no scheduler state but a scheduler was passed")
    _load_model_weights(model, meta.path / MODEL_DIR)
    if optimizer is not None:
        optimizer.load_state_dict(_load_tree(meta.path, "optimizer"))
    if scheduler is not None:
        scheduler.load_state_dict(_load_tree(meta.path, "scheduler"))
    if restore_rng:
        rng = _load_tree(meta.path, "rng")
        with _reading(meta.path / "rng.json"):
            _set_rng_state(rng)
    return meta
