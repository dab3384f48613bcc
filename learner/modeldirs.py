"""Directories of model files written atomically and durably: what checkpoints and published weights share.

Atomicity: a directory is written as ``root/.tmp-<name>-XXXX``, fsynced, then ``os.replace``d to
``root/<name>`` and the parent directory fsynced. A crash at any point leaves either the previous state or
a ``.tmp-*`` directory, which readers ignore and the next write removes. One writer per root is assumed
(the single learner). What is written gets the modes a plain write would have (``0666 & ~umask`` files,
``0777 & ~umask`` dirs), not the 0600/0700 of the temporary files it is written through.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from protocol.files import apply_default_modes, fsync_path


class PretrainedModel(Protocol):
    """The slice of ``transformers.PreTrainedModel`` used here."""

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = ...) -> Any: ...


def fsync_dir(path: Path) -> None:
    """fsync a directory, where the OS allows it."""
    # Directory fsync makes renames/creations durable on POSIX; not supported everywhere (Windows).
    with contextlib.suppress(OSError):
        fsync_path(path)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (save_pretrained doesn't fsync its files)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def tree_nbytes(root: Path) -> int:
    """Bytes of all files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def commit_dir(tmp: Path, final: Path, *, durable: bool = True) -> None:
    """Atomically move a finished ``tmp`` dir to ``final``; an existing ``final`` is replaced.

    ``durable`` fsyncs the files first, so the rename never exposes data a power loss could tear. The
    tree first gets the umask's modes (``mkdtemp`` makes ``tmp`` 0700 and safetensors writes 0600), so
    actors, SGLang servers and other users can read what is published (``protocol/files.py``).
    """
    apply_default_modes(tmp)
    if durable:
        fsync_tree(tmp)
    if final.exists():
        # os.replace can't overwrite a non-empty dir: move the old one aside first (rename is atomic).
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(final, trash)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(trash, final)  # never leave the old version only under a name the next write removes
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if durable:  # the rename is atomic for readers either way; fsyncing the parent was ~1/3 of a fast publication
        fsync_dir(final.parent)


def remove_leftovers(root: Path, prefix: str) -> None:
    """Remove ``.tmp-<prefix>*`` and ``.trash-<prefix>*`` dirs left by killed writers (single writer per root)."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith((f".tmp-{prefix}", f".trash-{prefix}")):
            shutil.rmtree(entry, ignore_errors=True)


def numbered_dirs(root: Path, pattern: re.Pattern[str], *, marker: str | None) -> list[tuple[int, Path]]:
    """``(number, path)`` of dirs in ``root`` whose name matches ``pattern`` (and hold ``marker``), sorted."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and (marker is None or (entry / marker).is_file()):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def prune_older(found: list[tuple[int, Path]], current: int, keep_last: int) -> None:
    """Keep ``current`` plus the ``keep_last - 1`` newest entries numbered below it; delete older ones.

    Entries numbered *above* ``current`` (left by a run that was later resumed from an older checkpoint)
    are left alone: deleting data automatically is worse than a little disk, and they are replaced when
    the new run reaches those numbers.
    """
    older = [path for number, path in found if number < current]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)


def require_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming the argument (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def save_model(model: PretrainedModel, directory: Path) -> None:
    """``model`` as an HF dir of safetensors (never a pickled ``pytorch_model.bin``)."""
    kwargs: dict[str, Any] = {}
    # transformers 4.x needs safe_serialization=True to avoid pytorch_model.bin (pickle); 5.x always
    # writes safetensors and no longer has the argument.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(directory), **kwargs)
    if not any(directory.glob("*.safetensors")):
        raise ValueError(f"save_pretrained wrote no .safetensors file in {directory}")

