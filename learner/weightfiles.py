"""The files of one published weights version, written fast: what changes every step is the tensors alone.

WHY: the learner publishes its weights every ``learner.publish_every`` steps as a bare HF dir. Writing it with
``save_pretrained`` (and the tokenizer's ``save_pretrained``) re-serialises the config, the generation config
and the tokenizer each time and walks transformers' tied-weight and sharding logic: ~80 ms per publication
for a 0.14M-parameter model on a loaded 2-core CPU, while the tensors themselves take under 1 ms
(docs/benchmarks.md, "Where the time goes"). ``WeightWriter`` does the full ``save_pretrained`` once, keeps the
files that do not depend on the weights (config, tokenizer) in memory, and from then on writes those bytes
plus one ``safetensors`` file of the current tensors under the names the first save used.

Safety is the caller's (``learner/publish.py``): everything is written into a fresh temporary dir that is
renamed into place, so readers never see a half-written version; the tensors go through ``safetensors``
(never pickle). The fast path is used only when the first save wrote exactly one ``.safetensors`` file whose
every tensor is in the model's ``state_dict`` with the same shape and dtype (no sharding, no renamed
weights); otherwise every publication keeps using ``save_pretrained``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from learner.modeldirs import PretrainedModel, save_model

log = logging.getLogger(__name__)


class SavesPretrained(Protocol):
    """A tokenizer (or processor): anything with HF's ``save_pretrained(dir)``."""

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any: ...


class WeightWriter:
    """Writes a model (and tokenizer) into a directory; after the first time, only the tensors are serialised."""

    def __init__(self) -> None:
        self.static: dict[str, bytes] | None = None  # file name -> bytes of every file but the tensors
        self.tensors_file = ""  # the .safetensors file's name
        self.names: list[str] = []  # the tensors it holds, as the first save named them
        self.metadata: dict[str, str] | None = None
        self.fast = True  # False once the first save showed the layout is not one plain file

    def write(self, model: PretrainedModel, directory: Path, tokenizer: SavesPretrained | None = None) -> None:
        """The HF dir of ``model`` (and ``tokenizer``) in ``directory``, which exists and is empty."""
        state = model.state_dict()
        if self.static is not None and self._same_layout(state):
            for name, blob in self.static.items():
                (directory / name).write_bytes(blob)
            self._save_tensors(state, directory / self.tensors_file)
            return
        save_model(model, directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        if self.fast and self.static is None:
            self._learn(directory, state)

    def _learn(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        """Remember what the first full save wrote, if the fast path can reproduce it."""
        from safetensors import safe_open

        files = sorted(p for p in directory.rglob("*") if p.is_file())
        tensors = [p for p in files if p.suffix == ".safetensors"]
        if len(tensors) != 1 or any(p.parent != directory for p in files) or any("index" in p.name for p in files):
            self.fast = False
            log.info("published weights: %d tensor files or nested files; every version uses save_pretrained",
                     len(tensors))
            return
        with safe_open(str(tensors[0]), framework="pt") as f:
            names = list(f.keys())
            metadata = f.metadata()
            ok = all(n in state and tuple(f.get_slice(n).get_shape()) == tuple(state[n].shape) for n in names)
            ok = ok and all(str(f.get_slice(n).get_dtype()) == _st_dtype(state[n]) for n in names)
        if not ok:
            self.fast = False
            log.info("published weights: the saved tensors are not the state_dict's; every version uses save_pretrained")
            return
        self.static = {p.name: p.read_bytes() for p in files if p != tensors[0]}
        self.tensors_file, self.names, self.metadata = tensors[0].name, names, metadata

    def _same_layout(self, state: dict[str, torch.Tensor]) -> bool:
        return all(n in state for n in self.names)

    def _save_tensors(self, state: dict[str, torch.Tensor], path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {n: state[n].detach().to("cpu").contiguous() for n in self.names}
        save_file(tensors, str(path), metadata=self.metadata)


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _st_dtype(t: torch.Tensor) -> str:
    """The safetensors name of a tensor's dtype (as ``safe_open(...).get_slice(n).get_dtype()`` reports it)."""
    return _DTYPES.get(t.dtype, str(t.dtype))
