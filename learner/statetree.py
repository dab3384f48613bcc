"""State dicts (optimizer, LR scheduler, RNG) as JSON plus one safetensors file: no pickle anywhere.

Why no ``torch.save``/``torch.load``: both are pickle, and loading pickle runs arbitrary code. Checkpoints
may be copied around, so a state dict is written as a JSON tree in which every tensor is replaced by a
reference into ``<name>.safetensors``; tuples, non-string keys, numpy arrays and non-finite floats are
tagged so that reading restores the exact Python types.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

_TAGS = ("__tensor__", "__tuple__", "__items__", "__ndarray__", "__float__")


def encode_tree(obj: Any, path: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    """JSON-able tree for ``obj``; tensors are moved into ``tensors`` and replaced by their key.

    Tuples, non-string dict keys (the optimizer's int param ids), numpy arrays and non-finite floats are
    tagged so ``decode_tree`` restores the exact Python types (``random.setstate`` insists on tuples).
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
        return {"__tuple__": [encode_tree(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, f"{path}/{i}", tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: encode_tree(v, f"{path}/{k}", tensors, seen) for k, v in obj.items()}
        return {
            "__items__": [
                [encode_tree(k, f"{path}/key", tensors, seen), encode_tree(v, f"{path}/{k}", tensors, seen)]
                for k, v in obj.items()
            ]
        }
    raise ValueError(f"cannot checkpoint a {type(obj).__name__} at {path or '/'}: not a tensor or JSON value")


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``encode_tree``: ``tensors`` holds the tensors its references name."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise ValueError(f"checkpoint references tensor {value!r} missing from its safetensors file")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(decode_tree(v, tensors) for v in value)
        if tag == "__items__":
            return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in value}
        if tag == "__ndarray__":
            return np.array(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
        if tag == "__float__":
            return float(value)
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


def save_tree(obj: Any, directory: Path, name: str) -> None:
    """``obj`` as ``directory/<name>.json`` (+ ``<name>.safetensors`` when it holds tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_tree(obj, "", tensors, set())
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    write_json(directory / f"{name}.json", tree)


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN), fsynced."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
