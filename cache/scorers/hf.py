"""Teacher scoring: per-token teacher logprobs and top-k alternatives for student rollouts.

WHY an `identity`: the teacher cache is content-addressed, and a cached score is only reusable when
the same weights, config, tokenizer, dtype and temperature produced it. The identity folds all of
those into one hash; `k` is deliberately left out because the cache adds it to its own key.

WHY `tokens_forwarded`: the point of the cache is to make the teacher compute less, so the scorer
counts the real (non-pad) tokens it ran through the model; tests and metrics read it.

One component (docs/architecture.md, "Adding a component"): the scorer, its config variant
(`teacher.engine.kind: hf`) and `build()`. torch and transformers are imported where the scorer runs:
the config tree (and so `opd --help`) loads this module without them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cache.scorers.base import Scores, empty_scores
from protocol.files import check_model_dir

if TYPE_CHECKING:
    import torch

_HASH_CHUNK_BYTES = 8 << 20


def file_sha256(path: Path) -> str:
    """Streamed sha256 so multi-GB weight shards never sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(model_dir: Path, revision: str | None) -> str:
    """sha256 of the weight files, or of the stated revision when one is given.

    WHY the revision shortcut: hashing a 16 GB teacher takes tens of seconds at every start; a pinned
    revision (e.g. a hub commit hash) already names the weights, so the caller may vouch with it.
    """
    if revision is not None:
        return f"revision:{revision}"
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise ValueError(f"model_dir: no *.safetensors or *.bin weight files in {model_dir}; pass revision=")
    return json.dumps({f.name: file_sha256(f) for f in files}, sort_keys=True)


def config_digest(config: dict[str, object]) -> str:
    """sha256 of the model config minus bookkeeping (local path, library version, load dtype).

    WHY: moving the directory or upgrading transformers must not invalidate the cache, while any
    architectural change (rope scaling, norms, vocab) must.
    """
    kept = {
        k: v
        for k, v in config.items()
        if not k.startswith("_") and k not in {"transformers_version", "dtype"}
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of the vocabulary and the special tokens, i.e. everything that fixes id meanings."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    blob = json.dumps({"vocab": vocab, "specials": specials}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class HFTeacherScorer:
    """`TeacherScorer` on a transformers causal LM: one batched forward per micro-batch."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = "float32",
        temperature: float = 1.0,
        revision: str | None = None,
        *,
        max_batch_tokens: int = 8192,
    ) -> None:
        """Load the teacher and compute its identity.

        `max_batch_tokens` bounds padded tokens per forward (memory), not what gets scored.
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from protocol.runtime import resolve_dtype

        self.model_dir = check_model_dir(model_dir, "model_dir")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.temperature = float(temperature)
        self.revision = revision
        self.max_batch_tokens = max_batch_tokens
        self.tokens_forwarded = 0
        kwargs = {} if revision is None else {"revision": revision}
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype, use_safetensors=True,
                                                          **kwargs)
        self.model.to(self.device).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, **kwargs)
        self.identity_fields: dict[str, str] = {
            "weights": weights_digest(self.model_dir, revision),
            "config": config_digest(self.model.config.to_dict()),
            "tokenizer": tokenizer_digest(tokenizer),
            "dtype": str(self.dtype),
            "temperature": repr(self.temperature),
        }
        blob = json.dumps(self.identity_fields, sort_keys=True)
        self.identity = hashlib.sha256(blob.encode()).hexdigest()

    def num_parameters(self) -> int:
        """Parameter count (tied weights counted once), used for FLOP accounting."""
        return sum(p.numel() for p in self.model.parameters())

    def score(self, sequences: list[np.ndarray], starts: list[int], k: int) -> list[Scores]:
        """Score tokens starts[i]..T_i-1 of each sequence (token t predicted from tokens < t).

        Logprobs are `log_softmax(logits / temperature)` in float32. Sequences whose response is
        empty (start == T) get empty arrays and cost no forward.
        """
        import torch

        self._validate(sequences, starts, k)
        results: list[Scores | None] = [None] * len(sequences)
        todo: list[int] = []
        for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
            if start == len(seq):
                results[i] = empty_scores(k)
            else:
                todo.append(i)
        todo.sort(key=lambda i: -len(sequences[i]))  # similar lengths together: less padding
        batch: list[int] = []
        with torch.inference_mode():
            for i in todo:
                if batch and len(sequences[batch[0]]) * (len(batch) + 1) > self.max_batch_tokens:
                    self._score_batch(sequences, starts, k, batch, results)
                    batch = []
                batch.append(i)
            if batch:
                self._score_batch(sequences, starts, k, batch, results)
        return [r for r in results if r is not None]

    def _score_batch(
        self,
        sequences: list[np.ndarray],
        starts: list[int],
        k: int,
        batch: list[int],
        results: list[Scores | None],
    ) -> None:
        """One right-padded forward; only logits from the earliest needed position on are kept."""
        import torch

        lengths = [len(sequences[i]) for i in batch]
        width = max(lengths)
        ids_BT = torch.zeros((len(batch), width), dtype=torch.long)
        mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids_BT[row, : lengths[row]] = torch.from_numpy(sequences[i].astype(np.int64))
            mask_BT[row, : lengths[row]] = 1
        keep = width - min(starts[i] for i in batch) + 1
        logits_BNV = self.model(
            input_ids=ids_BT.to(self.device), attention_mask=mask_BT.to(self.device), logits_to_keep=keep
        ).logits
        self.tokens_forwarded += sum(lengths)
        offset = width - logits_BNV.shape[1]  # padded position of logits_BNV[:, 0]
        for row, i in enumerate(batch):
            start, end = starts[i], lengths[row]
            logits_RV = logits_BNV[row, start - 1 - offset : end - 1 - offset].float()
            logp_RV = torch.log_softmax(logits_RV / self.temperature, dim=-1)
            targets_R = ids_BT[row, start:end].to(self.device)
            top_logp_RK, top_ids_RK = torch.topk(logp_RV, k, dim=-1, sorted=True)
            results[i] = Scores(
                logprobs_R=logp_RV.gather(-1, targets_R[:, None]).squeeze(1).cpu().numpy().astype(np.float32),
                topk_ids_RK=top_ids_RK.cpu().numpy().astype(np.int32),
                topk_logprobs_RK=top_logp_RK.cpu().numpy().astype(np.float32),
            )

    def _validate(self, sequences: list[np.ndarray], starts: list[int], k: int) -> None:
        if len(sequences) != len(starts):
            raise ValueError(f"starts has {len(starts)} entries but there are {len(sequences)} sequences")
        if not 0 <= k <= self.vocab_size:
            raise ValueError(f"k must be in [0, {self.vocab_size}], got {k}")
        for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
            if not isinstance(seq, np.ndarray) or seq.ndim != 1 or not np.issubdtype(seq.dtype, np.integer):
                raise ValueError(f"sequences[{i}] must be a 1-D integer numpy array")
            if len(seq) == 0:
                raise ValueError(f"sequences[{i}] is empty")
            if not 1 <= start <= len(seq):
                raise ValueError(f"starts[{i}]={start} must be in [1, {len(seq)}] (token 0 has no context)")
            if seq.min() < 0 or seq.max() >= self.vocab_size:
                raise ValueError(f"sequences[{i}] has token ids outside [0, {self.vocab_size})")



class HFScorerConfig(BaseModel):
    """`teacher.engine` for the embedded transformers scorer (the default; any teacher.temperature)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["hf"] = "hf"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (auto: cuda when torch sees one).")

    needs_model_dir: ClassVar[bool] = True  # the model runs here: teacher.model_dir is the model

    @property
    def server_url(self) -> str | None:
        """No server: the model runs in the teacher's process."""
        return None

    def check_temperature(self, temperature: float) -> None:
        """Any temperature: the scorer divides the logits itself."""

    def build(self, model_dir: str, *, revision: str | None, temperature: float) -> HFTeacherScorer:
        """The scorer on the teacher at `model_dir` (teacher.model_dir), on `device`."""
        from protocol.runtime import resolve_device

        if not model_dir:
            raise ValueError("teacher.model_dir is required when teacher.engine is 'hf'")
        return HFTeacherScorer(model_dir, device=resolve_device(self.device), temperature=temperature, revision=revision)
