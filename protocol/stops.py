"""Where an answer ends: the one definition of a model's stop tokens that every role uses.

WHY one function: a chat checkpoint ends a turn with an end-of-turn token that may differ from its
tokenizer's ``eos_token`` (Llama 3: ``<|eot_id|>`` beside ``<|end_of_text|>``; Qwen2.5: ``<|im_end|>``
beside ``<|endoftext|>``), and lists its stop tokens in ``generation_config.json``. If the actor stopped on
one set and the held-out evaluation on another, the student would be trained to end answers where the
evaluation never lets them end (or the reverse), and the KL would be measured on text nobody trains on.
So the actor's engine and the evaluator both call `stop_token_ids`; the teacher scores and the learner
trains every token the actor returns, the stop token included.

The stop tokens: every ``eos_token_id`` of the generation config (falling back to the model config), plus
the tokenizer's own EOS. A token the model could emit to end its turn is never missed; a model whose
generation config and tokenizer agree (SmolLM2: ``<|im_end|>``, id 2) gets that one id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _ids(raw: Any) -> list[int]:
    if raw is None:
        return []
    return [int(raw)] if isinstance(raw, int) else [int(t) for t in raw]


def config_eos_ids(model_dir: str | Path) -> list[int]:
    """The ``eos_token_id`` entries of `model_dir`'s generation config, else of its model config."""
    model_dir = Path(model_dir)
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            ids = _ids(json.loads(path.read_text()).get("eos_token_id"))
            if ids:
                return ids
    return []


def stop_token_ids(model_dir: str | Path, tokenizer: Any | None = None) -> list[int]:
    """Every token id that ends an answer for the model in `model_dir` (see the module docstring), sorted.

    `tokenizer`: the model's tokenizer when the caller has it loaded (its ``eos_token_id`` joins the set).
    """
    ids = set(config_eos_ids(model_dir))
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is not None:
        ids.add(int(eos))
    return sorted(ids)
