"""The actor's prompts: the JSONL prompt file encoded the one way every role encodes prompts.

The encoding itself lives in `protocol/prompts.py` (shared with `opd cache warm` and held-out
evaluation, which must produce the very same ids); this module only maps the actor's settings onto
it. The student/teacher tokenizer check lives in `protocol/vocab.py`. Prompts too long for the student's
context (with room for `actor.max_new_tokens`) are left out at start (`prompts_that_fit`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protocol.errors import InputError
from protocol.prompts import PromptFormat
from protocol.prompts import load_prompts as _load


def load_prompts(
    path: str | Path, tokenizer: Any, *, use_chat_template: bool | None = None, add_bos: bool | None = None
) -> list[list[int]]:
    """Token ids for every `{"prompt": "..."}` line (`actor.use_chat_template`, `actor.add_bos`).

    None (the default of both) follows the tokenizer: the chat template when it has one, and a
    leading BOS exactly when `tokenizer(text)` adds one (see `protocol/prompts.py`).
    """
    return _load(path, tokenizer, PromptFormat(use_chat_template=use_chat_template, add_bos=add_bos))


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""Where a Hugging Face config states the model's context length (the first one present wins)."""


def context_length(model_dir: str | Path) -> int | None:
    """The student's context length from its config.json, or None when there is none to read (an SGLang
    actor's `model_dir` may hold only the tokenizer: the server then refuses what does not fit)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompts_that_fit(prompts: list[list[int]], max_new_tokens: int, context: int | None,
                     *, path: str | Path = "actor.prompts_file") -> tuple[list[int], list[int]]:
    """(indices of the prompts that leave room for `max_new_tokens` in the context, indices of those that do not).

    WHY skip, not truncate: cutting a prompt changes the task it states (and the teacher would score a
    question nobody asked); a prompt the model cannot continue to the full budget is left out whole, at
    start, and counted (`opd_actor_prompts_skipped_total{reason="too_long"}`), never sampled (the engine
    would refuse it mid-run and stop the actor). None of them fitting is an `InputError` naming the keys.
    """
    if context is None:
        return list(range(len(prompts))), []
    room = context - max_new_tokens
    fit = [i for i, p in enumerate(prompts) if len(p) <= room]
    skipped = [i for i, p in enumerate(prompts) if len(p) > room]
    if not fit:
        longest = max(len(p) for p in prompts)
        raise InputError(f"{path}: no prompt fits the model's context of {context} tokens with actor.max_new_tokens="
                         f"{max_new_tokens} (room for {room} prompt tokens; the shortest prompt has "
                         f"{min(len(p) for p in prompts)}, the longest {longest})")
    return fit, skipped
