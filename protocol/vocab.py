"""Do the student and the teacher mean the same thing by token id i? Checked once, at start-up.

WHY: distillation and held-out evaluation compare the two distributions token by token, which is
only meaningful if id i is the same string for both. A tokenizer mismatch crashes nothing: it
silently trains on garbage, so it is refused at start with the first difference named.

WHY the tokenizer, not `config.vocab_size`: checkpoints pad their embedding matrix (Qwen2.5 0.5B
has 151936 rows, 7B 152064, for the same 151665-token tokenizer), so the models' logits differ in
width while the ids they can produce are the same. Everything that compares the two models works on
the shared tokenizer's ids, `[0, len(tokenizer))` (`shared_vocab_size`), and slices logits to it;
a model whose embedding is *smaller* than the tokenizer cannot score every id and is refused.

An SGLang server is checked through `/model_info` (its `tokenizer_path`) where that path is a
local directory; a hub name or a path on another machine cannot be compared here and is reported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")


def load_tokenizer(model_dir: str | Path, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained`, imported late (transformers is heavy)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, **kwargs)


def compare_tokenizers(student: Any, teacher: Any, labels: tuple[str, str] = ("student", "teacher")) -> None:
    """Raise ValueError naming the first kind of mismatch between two loaded tokenizers.

    Compared: the number of tokens, the id of every token, and the bos/eos/pad/unk ids. `labels`
    name the two sides in the message.
    """
    a, b = labels
    if len(student) != len(teacher):
        raise ValueError(f"tokenizer vocab size differs: {a} {len(student)} vs {b} {len(teacher)}")
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    differing = sorted(tok for tok in s_vocab.keys() | t_vocab.keys() if s_vocab.get(tok) != t_vocab.get(tok))
    if differing:
        shown = ", ".join(f"{tok!r}: {s_vocab.get(tok)} vs {t_vocab.get(tok)}" for tok in differing[:5])
        raise ValueError(f"tokenizer token ids differ for {len(differing)} tokens ({a} vs {b}): {shown}")
    for name in SPECIAL_TOKENS:
        s_id, t_id = getattr(student, f"{name}_token_id", None), getattr(teacher, f"{name}_token_id", None)
        if s_id != t_id:
            raise ValueError(f"tokenizer special token {name}_token differs: {a} id {s_id} vs {b} id {t_id}")


def shared_vocab_size(tokenizer: Any) -> int:
    """The ids both models can produce and be compared on: `[0, len(tokenizer))` (see module docs)."""
    return len(tokenizer)


def check_model_covers(model_vocab_size: int, tokenizer: Any, what: str) -> None:
    """Refuse a model whose logits are narrower than the tokenizer (it cannot score every id).

    Wider is fine (a padded embedding); callers slice logits to `shared_vocab_size`.
    """
    n = shared_vocab_size(tokenizer)
    if model_vocab_size < n:
        raise ValueError(f"{what}: config.vocab_size {model_vocab_size} is smaller than its tokenizer's "
                         f"{n} tokens: ids >= {model_vocab_size} cannot be scored")


def config_vocab_size(model_dir: str | Path) -> int:
    """`config.vocab_size` of a model directory (reads config.json only)."""
    from transformers import AutoConfig

    vocab = getattr(AutoConfig.from_pretrained(model_dir), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError(f"{model_dir}: config.json has no integer vocab_size")
    return vocab


def check_model_dirs(dirs: dict[str, str | Path]) -> None:
    """Every model dir (keyed by its config key) shares the first one's tokenizer and covers it.

    The message names both config keys and paths, then the first difference.
    """
    (first_key, first_dir), *rest = dirs.items()
    reference = load_tokenizer(first_dir)
    check_model_covers(config_vocab_size(first_dir), reference, f"{first_key} ({first_dir})")
    for key, model_dir in rest:
        tokenizer = load_tokenizer(model_dir)
        try:
            compare_tokenizers(reference, tokenizer, (first_key, key))
        except ValueError as exc:
            raise ValueError(f"{first_key} ({first_dir}) and {key} ({model_dir}) must share a tokenizer: "
                             f"{exc}") from None
        check_model_covers(config_vocab_size(model_dir), tokenizer, f"{key} ({model_dir})")


def check_served_tokenizer(url: str, local_dir: str | Path, key: str, local_key: str) -> str:
    """Compare an SGLang server's tokenizer (`/model_info`) with the one in `local_dir`.

    Returns what was checked, for the log; raises ValueError naming `key` on a mismatch. A server
    that does not answer, or whose `tokenizer_path` is not a local directory, cannot be checked
    here: that is said in the returned note, not raised (the role reports an unreachable server).
    """
    from protocol.sglang_http import SGLangClient, SGLangError

    try:
        info = SGLangClient(url, control_timeout_s=10.0).model_info()
    except SGLangError as exc:
        return f"{key} ({url}): tokenizer not checked, the server did not answer ({exc})"
    path = str(info.get("tokenizer_path") or info.get("model_path") or "")
    if not path or not Path(path).is_dir():
        return f"{key} ({url}): tokenizer not checked, the server's tokenizer_path {path!r} is not a local directory"
    try:
        compare_tokenizers(load_tokenizer(local_dir), load_tokenizer(path), (local_key, key))
    except ValueError as exc:
        raise ValueError(f"{local_key} ({local_dir}) and the model {key} serves ({path}) must share a "
                         f"tokenizer: {exc}") from None
    return f"{key} ({url}): serves tokenizer {path}, same as {local_key}"
