"""Prompt text -> token ids, the one way every role does it (actors, `opd cache warm`, evaluation).

WHY one function, in protocol/: the teacher cache is keyed by token ids and evaluation compares the
student with the teacher on prompts it encodes itself. If `opd cache warm` encoded a prompt
differently from the actors (a BOS more or less, no chat template), every warmed entry would be a
silent miss; if evaluation did, the held-out KL would be measured on prompts the student never
trains on. So the actors, the warmer and the evaluator all call `encode_prompt` with the same
`PromptFormat` (the actor's settings: `actor.use_chat_template`, `actor.add_bos`).

WHY the tokenizer's own BOS convention by default: a model is trained with or without a leading BOS
(Llama and Gemma with, GPT-2 and Qwen without), and its tokenizer records which: `tokenizer(text)`
adds the BOS exactly when the model expects one. Forcing a BOS onto a model trained without one
pushes it off its distribution (measured: a small BOS-less model's greedy accuracy fell from 17% to
0%). `add_bos` overrides the convention when the tokenizer's is wrong for the checkpoint.

Only the leading BOS is taken from the tokenizer's post-processor: a trailing EOS that some tokenizer
configurations append (`add_eos_token`) never goes into a prompt the model must continue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import InputError


@dataclass(frozen=True)
class PromptFormat:
    """How prompt text becomes ids; None means "the tokenizer's own convention".

    use_chat_template: one user turn through the chat template plus the generation prompt (None:
        when the tokenizer has a template). add_bos: whether the ids start with the BOS token (None:
        as `tokenizer(text)` does for plain text, as the template does for templated text).
    """

    use_chat_template: bool | None = None
    add_bos: bool | None = None


def tokenizer_adds_bos(tokenizer: Any, text: str = "a") -> bool:
    """Whether `tokenizer(text)` puts the BOS token in front of `text` (the model's convention)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer.encode(text, add_special_tokens=True)
    plain = tokenizer.encode(text, add_special_tokens=False)
    return list(with_special[:1]) == [bos] and list(plain[:1]) != [bos]


def uses_chat_template(tokenizer: Any, fmt: PromptFormat) -> bool:
    """Whether prompts go through the chat template; True without a template is an error."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt.use_chat_template and not has_template:
        raise ValueError(f"actor.use_chat_template is true but the tokenizer ({_name(tokenizer)}) has no chat template")
    return has_template and fmt.use_chat_template is not False


def encode_prompt(tokenizer: Any, text: str, fmt: PromptFormat = PromptFormat()) -> list[int]:
    """Ids of one prompt: through the chat template or as plain text, with the BOS as `fmt` says."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if fmt.add_bos and bos is None:
        raise ValueError(f"actor.add_bos is true but the tokenizer ({_name(tokenizer)}) defines no bos_token")
    if uses_chat_template(tokenizer, fmt):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ids = [int(t) for t in encoded["input_ids"]]
        if fmt.add_bos is None:
            return ids  # the template writes the BOS where the model expects it
        starts_with_bos = bos is not None and ids[:1] == [bos]
        if fmt.add_bos and not starts_with_bos:
            return [int(bos), *ids]
        return ids[1:] if starts_with_bos and not fmt.add_bos else ids
    ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    add = tokenizer_adds_bos(tokenizer, text) if fmt.add_bos is None else fmt.add_bos
    return [int(bos), *ids] if add and bos is not None else ids


def prompt_text(line: str, lineno: int, path: Path | str) -> str:
    """The `prompt` string of one JSONL line, or an `InputError` (a ValueError) naming the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise InputError(f"{path}:{lineno}: missing 'prompt'")
    text = record["prompt"]
    if not isinstance(text, str):
        raise InputError(f"{path}:{lineno}: 'prompt' must be a string, got {type(text).__name__}")
    if not text:
        raise InputError(f"{path}:{lineno}: 'prompt' is empty")
    return text


def load_prompts(
    path: str | Path, tokenizer: Any, fmt: PromptFormat = PromptFormat(), *, limit: int | None = None
) -> list[list[int]]:
    """Token ids of every `{"prompt": "..."}` line of a JSONL file (blank lines skipped), at most `limit`."""
    path = Path(path)
    uses_chat_template(tokenizer, fmt)  # a template asked for but missing fails before reading the file
    prompts: list[list[int]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(prompts) >= limit:
                break
            if line.strip():
                prompts.append(encode_prompt(tokenizer, prompt_text(line, lineno, path), fmt))
    if not prompts:
        raise InputError(f"{path}: no prompts found (the file is empty or holds only blank lines)")
    return prompts


def check_prompt_file(path: str | Path) -> int:
    """Read every line of a JSONL prompt file as `load_prompts` would, without a tokenizer; the prompt count.

    WHY: `opd up` calls it before starting anything, so a malformed line or an empty file stops the run at
    once with the file and line named, instead of an actor dying after Redis and the other roles started.
    """
    path = Path(path)
    count = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                prompt_text(line, lineno, path)
                count += 1
    if not count:
        raise InputError(f"{path}: no prompts found (the file is empty or holds only blank lines)")
    return count


@dataclass(frozen=True)
class ReferencePrompt:
    """One held-out problem with its reference answer (text, no EOS) and where it came from."""

    prompt: str
    reference: str
    where: str  # "path:line", for error messages


REFERENCE_KEYS = ("response", "continuation")


def load_references(path: str | Path, *, limit: int, key: str = "learner.eval.accuracy_prompts") -> list[ReferencePrompt]:
    """The first `limit` non-blank lines of a JSONL file as (prompt, reference answer) pairs.

    The reference is `response` or `continuation`, the same keys `opd cache warm` scores as reference
    answers, so one file serves both. (`answer`, where a task file has one, is not used: in the task's
    files it is only the final result, not the text the model must write.) A line without one, or with
    both, is an error naming the file, the line and `key`, the setting that asked for references.
    """
    path = Path(path)
    refs: list[ReferencePrompt] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if len(refs) >= limit:
                break
            if not line.strip():
                continue
            text = prompt_text(line, lineno, path)
            record = json.loads(line)
            present = [k for k in REFERENCE_KEYS if k in record]
            if len(present) != 1 or not isinstance(record[present[0]], str):
                what = "both 'response' and 'continuation'" if len(present) == 2 else (
                    "no 'response' (or 'continuation') string" if not present else f"a non-string '{present[0]}'")
                raise ValueError(f"{path}:{lineno}: {key} needs a reference answer on each of the first {limit} "
                                 f"held-out lines; this line has {what}")
            refs.append(ReferencePrompt(text, record[present[0]], f"{path}:{lineno}"))
    if len(refs) < limit:
        raise ValueError(f"{key} is {limit} but {path} has only {len(refs)} prompts")
    return refs


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
