"""Prompt loading and the student/teacher tokenizer compatibility check.

WHY the check lives here: distillation compares the student's and the teacher's distributions token
by token, which is only meaningful if token id i means the same string to both. A mismatch would not
crash anything downstream, it would silently train on garbage, so it is refused at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer


def load_prompts(
    path: str | Path, tokenizer: Any, *, use_chat_template: bool | None = None
) -> list[list[int]]:
    """Token ids for every `{"prompt": "..."}` line of a JSONL file (blank lines are skipped).

    Chat template: applied (as one user turn plus the generation prompt) when the tokenizer has one
    and `use_chat_template` is None or True; True without a template is an error. Otherwise the text
    is tokenized without special tokens and the tokenizer's BOS (if any) is put in front, so the
    result does not depend on the tokenizer's post-processor settings.
    """
    path = Path(path)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template and not has_template:
        raise ValueError(f"use_chat_template=True but the tokenizer for {path} has no chat template")
    templated = has_template and use_chat_template is not False
    prompts: list[list[int]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            text = prompt_text(line, lineno, path)
            prompts.append(encode_prompt(tokenizer, text, templated))
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def prompt_text(line: str, lineno: int, path: Path) -> str:
    """The `prompt` string of one JSONL line, or a ValueError naming the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise ValueError(f"{path}:{lineno}: missing 'prompt'")
    text = record["prompt"]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{lineno}: 'prompt' must be a string, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{path}:{lineno}: 'prompt' is empty")
    return text


def encode_prompt(tokenizer: Any, text: str, templated: bool) -> list[int]:
    """Ids of one prompt, either through the chat template or as BOS + plain tokens."""
    if templated:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return [int(t) for t in encoded["input_ids"]]
    ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos), *ids] if bos is not None else ids


def check_same_tokenizer(student_dir: str | Path, teacher_dir: str | Path) -> None:
    """Raise ValueError naming the first kind of mismatch between the two tokenizers.

    Compared: vocabulary size, the id of every token, and the bos/eos/pad/unk ids.
    """
    student = AutoTokenizer.from_pretrained(student_dir)
    teacher = AutoTokenizer.from_pretrained(teacher_dir)
    if len(student) != len(teacher):
        raise ValueError(f"tokenizer vocab size differs: student {len(student)} vs teacher {len(teacher)}")
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    differing = sorted(tok for tok in s_vocab.keys() | t_vocab.keys() if s_vocab.get(tok) != t_vocab.get(tok))
    if differing:
        shown = ", ".join(f"{tok!r}: {s_vocab.get(tok)} vs {t_vocab.get(tok)}" for tok in differing[:5])
        raise ValueError(
            f"tokenizer token ids differ for {len(differing)} tokens (student vs teacher): {shown}"
        )
    for name in ("bos", "eos", "pad", "unk"):
        s_id, t_id = getattr(student, f"{name}_token_id", None), getattr(teacher, f"{name}_token_id", None)
        if s_id != t_id:
            raise ValueError(
                f"tokenizer special token {name}_token differs: student id {s_id} vs teacher id {t_id}"
            )
