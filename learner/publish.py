"""Weight publication: the policy the actors sample from, as a bare HF dir ``root/v000123/``.

Written atomically like a checkpoint (``learner/modeldirs.py``: tmp dir + rename), with the modes a plain
write would have, so actors, SGLang servers and other users can read it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

from learner.modeldirs import (
    PretrainedModel,
    commit_dir,
    numbered_dirs,
    prune_older,
    remove_leftovers,
    require_int,
    save_model,
    tree_nbytes,
)

_VERSION_RE = re.compile(r"^v(\d{6,})$")


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
    version = require_int("version", version, 0)
    keep_last = require_int("keep_last", keep_last, 1)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = version_dir_name(version)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        save_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        nbytes = tree_nbytes(tmp)
        final = root / name
        commit_dir(tmp, final, durable=durable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_leftovers(root, "v")
    prune_older(numbered_dirs(root, _VERSION_RE, marker=None), version, keep_last)
    return final, nbytes
