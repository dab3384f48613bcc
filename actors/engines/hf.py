"""In-process rollout engine on plain transformers (CPU by default, any torch device works).

WHY a hand-written sampling loop instead of `model.generate()`:

- the behaviour logprob of every sampled token must come from exactly the distribution the token was
  drawn from (the learner's importance ratios depend on it), and `generate()` does not expose that;
- every row has its own `max_new_tokens` (the truncation horizon). Rows that hit their horizon or EOS
  are dropped from the batch and its KV cache, and the loop ends when no row is left, so truncated
  rollouts really cost fewer forward tokens.

Behaviour logprobs: `Generation.logprobs[j]` is the log-probability of the sampled token under the
sampling distribution actually used: `log_softmax(logits / temperature)`, restricted to the top-p
nucleus and renormalised (`protocol/sampling.py`, the same transform the learner recomputes). With
`temperature == 1` and `top_p == 1` this is exactly the raw model logprob. `temperature == 0` means
greedy decoding; there the raw model logprob (temperature 1, no nucleus) is returned, because the
point-mass sampling distribution would always give 0 (rollouts refuse it: `RolloutPrefix.temperature`
must be > 0, so greedy output never reaches the learner's importance ratio).

One component (docs/architecture.md, "Adding a component"): the engine, its config variant
(`actor.engine.kind: hf`) and `build()`. torch and transformers are imported where the engine runs,
not at the top: the config tree (and so `opd --help`) loads this module without them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from actors.engines.base import Generation
from protocol.files import check_model_dir
from protocol.stops import stop_token_ids

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

# Config keys that differ between checkpoints of the same architecture without changing the weights' layout.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "dtype", "torch_dtype"})


def layout_config(config: dict[str, object]) -> dict[str, object]:
    """The parts of a model config that determine parameter names and shapes."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF directory: the shards named by the index, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


def _tokenizer_or_none(model_dir: Path) -> Any:
    """The model dir's tokenizer (its EOS joins the stop tokens), or None for a dir that ships none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None


class HFRolloutEngine:
    """`RolloutEngine` on a transformers causal LM with a KV cache and per-row horizons.

    In-process, so a failure is a bug or a bad input, never transient: the actor retries nothing.
    """

    max_failures = 0

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = "float32",
        *,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        """Load the student from an HF directory.

        `eos_token_ids` overrides the stop tokens; by default they come from the generation config
        (falling back to the model config), as a chat model may have several.
        """
        import torch

        from protocol.runtime import resolve_dtype

        self.model_dir = check_model_dir(model_dir, "model_dir")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.version = 0
        self.model = self._load_full(self.model_dir)
        self.eos_token_ids = self._stop_tokens(eos_token_ids)
        pad = self.model.config.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]

    # ---- RolloutEngine -------------------------------------------------------------------------

    def num_parameters(self) -> int:
        """Parameter count (tied weights counted once), used for FLOP accounting."""
        return sum(p.numel() for p in self.model.parameters())

    def is_transient(self, exc: Exception) -> bool:
        """Nothing an in-process model raises goes away by retrying."""
        return False

    def load_weights(self, path: str, version: int) -> None:
        """Switch to the weights saved at `path` (an HF directory) and remember `version`.

        WHY the fast path: the learner publishes a new version every few steps; rebuilding the model
        with `from_pretrained` each time is slow, so when the architecture is unchanged the tensors
        are copied from the safetensors files into the live parameters (cast to this engine's
        dtype). Anything unexpected falls back to a full `from_pretrained`.
        """
        from transformers import AutoConfig

        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        weights_dir = check_model_dir(path, f"published weights v{version}")
        # Compare against the live model's config: the directory it came from may be deleted by now.
        same_layout = layout_config(AutoConfig.from_pretrained(weights_dir).to_dict()) == layout_config(
            self.model.config.to_dict()
        )
        if not (same_layout and self._copy_weights(weights_dir)):
            self.model = self._load_full(weights_dir)
        self.model_dir = weights_dir
        self.version = version

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """Sample one continuation per prompt; row i stops at EOS or after `max_new_tokens[i]` tokens.

        The EOS token, when sampled, is the last element of `response_ids` (with its logprob) and
        sets `finished=True`. `seed` makes the batch reproducible (same prompts, limits, settings).
        """
        import torch

        self._validate(prompts, max_new_tokens, temperature, top_p)
        results = [Generation(response_ids=[], logprobs=[], finished=False) for _ in prompts]
        rows = [i for i, limit in enumerate(max_new_tokens) if limit > 0]
        if rows:
            with torch.inference_mode():
                self._decode(prompts, max_new_tokens, rows, results, temperature, top_p, seed)
        return results

    def _decode(
        self, prompts: list[list[int]], max_new_tokens: list[int], rows: list[int], results: list[Generation],
        temperature: float, top_p: float, seed: int | None,
    ) -> None:
        """The sampling loop over the rows with a budget; appends to `results[row]` in place."""
        import torch
        from transformers import DynamicCache

        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)

        ids_BP, mask_BP = self._left_pad([prompts[i] for i in rows])
        position_BP = (mask_BP.cumsum(dim=1) - 1).clamp(min=0)
        active_B = torch.tensor(rows, device=self.device)
        limits_B = torch.tensor([max_new_tokens[i] for i in rows], device=self.device)
        eos_E = torch.tensor(self.eos_token_ids, device=self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids_BP, attention_mask=mask_BP, position_ids=position_BP, cache=cache, use_cache=True
        )
        logits_BV = out.logits[:, -1, :]
        next_position_B = position_BP[:, -1] + 1
        mask_BS = mask_BP
        for step in range(1, int(limits_B.max()) + 1):
            token_B, logprob_B = sample_tokens(logits_BV, temperature, top_p, generator)
            eos_B = torch.isin(token_B, eos_E)
            done_B = eos_B | (limits_B <= step)
            for row, token, logprob, eos in zip(
                active_B.tolist(), token_B.tolist(), logprob_B.tolist(), eos_B.tolist(), strict=True
            ):
                results[row].response_ids.append(token)
                results[row].logprobs.append(logprob)
                results[row].finished = eos
            if bool(done_B.all()):
                break
            if bool(done_B.any()):
                keep_B = (~done_B).nonzero().squeeze(1)
                cache.batch_select_indices(keep_B)
                active_B, limits_B, token_B = active_B[keep_B], limits_B[keep_B], token_B[keep_B]
                mask_BS, next_position_B = mask_BS[keep_B], next_position_B[keep_B]
            mask_BS = torch.cat([mask_BS, torch.ones_like(mask_BS[:, :1])], dim=1)
            out = self.model(
                input_ids=token_B[:, None],
                attention_mask=mask_BS,
                position_ids=next_position_B[:, None],
                cache=cache,
                use_cache=True,
            )
            logits_BV = out.logits[:, -1, :]
            next_position_B = next_position_B + 1

    # ---- helpers -------------------------------------------------------------------------------

    def _load_full(self, model_dir: Path) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype, use_safetensors=True)
        return model.to(self.device).eval()

    def _copy_weights(self, weights_dir: Path) -> bool:
        """Copy tensors into the live model; False (nothing usable) if names don't line up."""
        import torch
        from safetensors.torch import load_file

        files = safetensors_files(weights_dir)
        if not files:
            return False
        params = self.model.state_dict(keep_vars=True)
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f, device=str(self.device)))
        if set(state) - set(params):
            return False
        loaded_ids = {id(params[name]) for name in state}
        if any(id(params[name]) not in loaded_ids for name in set(params) - set(state)):
            return False  # a parameter that is not tied to a loaded one would keep stale values
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                return False
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        return True

    def _stop_tokens(self, override: Sequence[int] | None) -> list[int]:
        if override is not None:
            ids = [int(t) for t in override]
        else:  # the one definition of where an answer ends, shared with the held-out evaluation
            ids = stop_token_ids(self.model_dir, _tokenizer_or_none(self.model_dir))
        if not ids:
            raise ValueError(f"eos_token_ids: none given and {self.model_dir} defines no eos_token_id")
        return ids

    def _validate(
        self, prompts: list[list[int]], max_new_tokens: list[int], temperature: float, top_p: float
    ) -> None:
        if len(prompts) != len(max_new_tokens):
            raise ValueError(
                f"max_new_tokens has {len(max_new_tokens)} entries but there are {len(prompts)} prompts"
            )
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        vocab = self.model.config.vocab_size
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        for i, (prompt, limit) in enumerate(zip(prompts, max_new_tokens, strict=True)):
            if not prompt:
                raise ValueError(f"prompts[{i}] is empty")
            if limit < 0:
                raise ValueError(f"max_new_tokens[{i}] must be >= 0, got {limit}")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab})")
            if max_positions is not None and len(prompt) + limit > max_positions:
                raise ValueError(
                    f"prompts[{i}]: {len(prompt)} prompt + {limit} new tokens exceed "
                    f"max_position_embeddings={max_positions}"
                )

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad so every row's next token is predicted at the last column."""
        import torch

        width = max(len(p) for p in prompts)
        ids_BP = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask_BP = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids_BP[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask_BP[i, width - len(prompt) :] = 1
        return ids_BP.to(self.device), mask_BP.to(self.device)


def sample_tokens(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (tokens, their logprob under the distribution drawn from).

    The distribution is `protocol.sampling.sampling_logprobs` (temperature, then the top-p nucleus,
    renormalised): the one transform the learner recomputes for its importance ratio. Computed in
    float32 whatever the model dtype, so logprobs are comparable across engines.
    """
    import torch

    from protocol.sampling import sampling_logprobs

    if temperature == 0:
        logp_BV = torch.log_softmax(logits_BV.float(), dim=-1)
        token_B = logp_BV.argmax(dim=-1)
        return token_B, logp_BV.gather(-1, token_B[:, None]).squeeze(1)
    logp_BV = sampling_logprobs(logits_BV, temperature, top_p)
    token_B = torch.multinomial(logp_BV.exp(), num_samples=1, generator=generator).squeeze(1)
    return token_B, logp_BV.gather(-1, token_B[:, None]).squeeze(1)


class HFEngineConfig(BaseModel):
    """`actor.engine` for the embedded transformers engine (the default; CPU or a local GPU)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["hf"] = "hf"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (auto: cuda when torch sees one).")

    @property
    def server_url(self) -> str | None:
        """No server: the model runs in the actor's process."""
        return None

    def check_sampling(self, temperature: float, top_p: float) -> None:
        """Any temperature and top-p: the engine samples from `protocol/sampling.py`'s transform itself."""

    def build(self, model_dir: str) -> HFRolloutEngine:
        """The engine on the student at `model_dir` (actor.model_dir), on `device`."""
        from protocol.runtime import resolve_device

        return HFRolloutEngine(model_dir, device=resolve_device(self.device))
