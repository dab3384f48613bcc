"""The actor's prompts: the JSONL prompt file encoded the one way every role encodes prompts.

The encoding itself lives in `protocol/prompts.py` (shared with `opd cache warm` and held-out
evaluation, which must produce the very same ids); this module only maps the actor's settings onto
it. The student/teacher tokenizer check lives in `protocol/vocab.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
