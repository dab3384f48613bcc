"""Crash-safe checkpoints and weight publication, with no pickle anywhere.

Why no ``torch.save``/``torch.load``: both are pickle, and loading pickle runs arbitrary code. Weights are
read by other processes (actors) and checkpoints may be copied around, so every file here is either
safetensors (tensors) or JSON (everything else).

Checkpoint layout (``root/step-000123/``)::

    model/                     HF ``save_pretrained`` dir (config.json, model.safetensors): actors and
                               ``from_pretrained`` can load it directly
    optimizer.json             optimizer.state_dict() with tensors replaced by references ...
    optimizer.safetensors      ... to these tensors (exp_avg, exp_avg_sq, step)
    scheduler.json             scheduler.state_dict() (+ scheduler.safetensors if it holds tensors)
    rng.json, rng.safetensors  python / numpy global RNG (JSON), torch CPU + CUDA RNG (uint8 tensors)
    meta.json                  step, policy_version, extra (e.g. stream positions), created_at
    COMPLETE                   written (and fsynced) last

Atomicity: everything is written into ``root/.tmp-step-000123-XXXX``, fsynced, then ``os.replace``d to
``root/step-000123`` and the parent directory fsynced. A crash at any point leaves either the previous
state or a ``.tmp-*`` directory, which ``latest_checkpoint`` ignores (it also requires ``COMPLETE``) and
the next save removes. One writer per root is assumed (the single learner).

Published weights (``root/v000123/``) are a bare HF dir, written the same way (tmp + rename). Both get
the modes a plain write would have (``0666 & ~umask`` files, ``0777 & ~umask`` dirs), not the 0600/0700
of the temporary files they are written through.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from protocol.files import apply_default_modes

FORMAT_VERSION = 1
MODEL_DIR = "model"
COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"
_STEP_RE = re.compile(r"^step-(\d{6,})$")
_VERSION_RE = re.compile(r"^v(\d{6,})$")
_TAGS = ("__tensor__", "__tuple__", "__items__", "__ndarray__", "__float__")


class PretrainedModel(Protocol):
    """The slice of ``transformers.PreTrainedModel`` used here."""

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = ...) -> Any: ...


class StatefulObject(Protocol):
    """An optimizer or LR scheduler."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


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
# JSON + safetensors encoding of arbitrary state dicts


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    """JSON-able tree for ``obj``; tensors are moved into ``tensors`` and replaced by their key.

    Tuples, non-string dict keys (the optimizer's int param ids), numpy arrays and non-finite floats are
    tagged so ``_decode`` restores the exact Python types (``random.setstate`` insists on tuples).
    """
    if isinstance(obj, torch.Tensor):
        key = path if path not in tensors else f"{path}#{len(tensors)}"
        tensor = obj.detach().to("cpu")
        # safetensors refuses tensors sharing storage, and views of larger storages: copy those.
        storage = tensor.untyped_storage()
        if (
            storage.data_ptr() in seen
            or not tensor.is_contiguous()
            or storage.nbytes() != tensor.numel() * tensor.element_size()
        ):
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
        return {"__tensor__": key}
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors, seen) for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, f"{path}/key", tensors, seen), _encode(v, f"{path}/{k}", tensors, seen)]
                for k, v in obj.items()
            ]
        }
    raise ValueError(f"cannot checkpoint a {type(obj).__name__} at {path or '/'}: not a tensor or JSON value")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise ValueError(f"checkpoint references tensor {value!r} missing from its safetensors file")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__items__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        if tag == "__ndarray__":
            return np.array(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
        if tag == "__float__":
            return float(value)
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _save_tree(obj: Any, directory: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, "", tensors, set())
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    _write_json(directory / f"{name}.json", tree)


def _load_tree(directory: Path, name: str) -> Any:
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file), device="cpu") if tensor_file.exists() else {}
    return _decode(_read_json(directory / f"{name}.json"), tensors)


# ---------------------------------------------------------------------------------------------------
# filesystem helpers


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes renames/creations durable on POSIX; not supported everywhere (Windows).
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (save_pretrained doesn't fsync its files)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _tree_nbytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _commit(tmp: Path, final: Path, *, durable: bool = True) -> None:
    """Atomically move a finished ``tmp`` dir to ``final``; an existing ``final`` is replaced.

    ``durable`` fsyncs the files first, so the rename never exposes data a power loss could tear. The
    tree first gets the umask's modes (``mkdtemp`` makes ``tmp`` 0700 and safetensors writes 0600), so
    actors, SGLang servers and other users can read what is published (``protocol/files.py``).
    """
    apply_default_modes(tmp)
    if durable:
        _fsync_tree(tmp)
    if final.exists():
        # os.replace can't overwrite a non-empty dir: move the old one aside first (rename is atomic).
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _remove_leftovers(root: Path, prefix: str) -> None:
    """Remove ``.tmp-<prefix>*`` and ``.trash-<prefix>*`` dirs left by killed writers (single writer per root)."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith((f".tmp-{prefix}", f".trash-{prefix}")):
            shutil.rmtree(entry, ignore_errors=True)


def _numbered_dirs(root: Path, pattern: re.Pattern[str], *, marker: str | None) -> list[tuple[int, Path]]:
    """``(number, path)`` of dirs in ``root`` whose name matches ``pattern`` (and hold ``marker``), sorted."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and (marker is None or (entry / marker).is_file()):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _prune_older(found: list[tuple[int, Path]], current: int, keep_last: int) -> None:
    """Keep ``current`` plus the ``keep_last - 1`` newest entries numbered below it; delete older ones.

    Entries numbered *above* ``current`` (left by a run that was later resumed from an older checkpoint)
    are left alone: deleting data automatically is worse than a little disk, and they are replaced when
    the new run reaches those numbers.
    """
    older = [path for number, path in found if number < current]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)


def _require_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# model weights


def _save_model(model: PretrainedModel, directory: Path) -> None:
    kwargs: dict[str, Any] = {}
    # transformers 4.x needs safe_serialization=True to avoid pytorch_model.bin (pickle); 5.x always
    # writes safetensors and no longer has the argument.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(directory), **kwargs)
    if not any(directory.glob("*.safetensors")):
        raise ValueError(f"save_pretrained wrote no .safetensors file in {directory}")


def _load_model_weights(model: PretrainedModel, directory: Path) -> None:
    """Copy the HF safetensors weights in ``directory`` into ``model`` in place (no new model object, so
    the optimizer's references to the parameters stay valid)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    loaded: dict[str, torch.Tensor] = {}
    for filename in files:
        path = directory / filename
        if not path.is_file():
            raise ValueError(f"checkpoint weights file {path} is missing")
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
    return [path for _, path in _numbered_dirs(Path(root), _STEP_RE, marker=COMPLETE_MARKER)]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    meta = _read_json(path / META_FILE)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format_version {meta.get('format_version')!r}")
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
    newest older ones (see ``_prune_older`` for newer leftovers).

    ``extra`` is any JSON-able dict (stream positions, ledger counters ...), returned by ``load_checkpoint``.
    An existing checkpoint of the same step is replaced. Returns the checkpoint path.
    """
    step = _require_int("step", step, 0)
    policy_version = _require_int("policy_version", policy_version, 0)
    keep_last = _require_int("keep_last", keep_last, 1)
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-serializable (no NaN/inf): {exc}") from exc

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        _save_model(model, tmp / MODEL_DIR)
        if optimizer is not None:
            _save_tree(optimizer.state_dict(), tmp, "optimizer")
        if scheduler is not None:
            _save_tree(scheduler.state_dict(), tmp, "scheduler")
        _save_tree(_rng_state(), tmp, "rng")
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
        _write_json(tmp / META_FILE, meta)
        _write_json(tmp / COMPLETE_MARKER, {"step": step})  # last: its presence means "all of the above"
        final = root / name
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _remove_leftovers(root, "step-")
    _prune_older(_numbered_dirs(root, _STEP_RE, marker=COMPLETE_MARKER), step, keep_last)
    return final


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
    raw = _read_json(meta.path / META_FILE)
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
        _set_rng_state(_load_tree(meta.path, "rng"))
    return meta


# ---------------------------------------------------------------------------------------------------
# weight publication


def version_dir_name(version: int) -> str:
    return f"v{version:06d}"


def list_published(root: str | os.PathLike[str]) -> list[Path]:
    """Published weight dirs under ``root``, oldest version first."""
    return [path for _, path in _numbered_dirs(Path(root), _VERSION_RE, marker=None)]


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
    """
    version = _require_int("version", version, 0)
    keep_last = _require_int("keep_last", keep_last, 1)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = version_dir_name(version)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        _save_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        nbytes = _tree_nbytes(tmp)
        final = root / name
        _commit(tmp, final, durable=durable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_leftovers(root, "v")
    _prune_older(_numbered_dirs(root, _VERSION_RE, marker=None), version, keep_last)
    return final, nbytes
