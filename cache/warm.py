"""`opd cache warm`: offline teacher caching, scoring a dataset ahead of training.

It runs `cache.scoring.score_with_cache`, the very code a live teacher runs, with the same
namespace, Redis prefix and block size, so a warmed entry is indistinguishable from one a teacher
stored. Input lines:

- `{"ids": [1, 17, ...]}`: the exact token ids (prompt + response). Preferred: cache keys are
  token blocks, and only equal ids hit.
- `{"prompt": "...", "response": "..."}` (or `"continuation"`, as the tiny prompt files have):
  text, the prompt encoded by `protocol.prompts.encode_prompt`, the very function the actors use,
  with the actor's settings (`actor.use_chat_template`, `actor.add_bos`, which `opd` passes as
  `args.prompt_format`; `--no-chat-template` forces plain text), then the response appended as plain
  tokens (+ EOS with `--append-eos`). Prompt blocks therefore match what actors send; a text
  response hits only where the student's sampled ids equal this tokenization. `--ids-only` refuses
  text lines.

The whole file is read and checked before the model loads, so a bad line costs seconds, not a
model load; sequences are held in memory as int32 (4 bytes per token). Exit codes and the shared
command-line helpers are `cache/cli.py`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cache.config import TeacherConfig
from cache.console import (
    MAX_REPORTED_LINE_ERRORS,
    UsageError,
    checked_redis,
    human_bytes,
    note,
    print_json,
    report_error,
    table,
)
from cache.layout import validate_writer_id
from cache.scoring import score_with_cache
from cache.teacher import make_scorer, open_cache, topk_storage_dtype
from protocol.config import TransportConfig
from protocol.names import Names
from protocol.prompts import PromptFormat, encode_prompt

if TYPE_CHECKING:
    from cache.scorers.base import TeacherScorer
    from cache.store import TeacherCache

PROGRESS_EVERY_S = 2.0
_INT32_MAX = int(np.iinfo(np.int32).max)




@dataclass
class WarmLine:
    """One input line: exact ids, or text to tokenize (prompt + optional response)."""

    lineno: int
    ids: np.ndarray | None = None
    prompt: str | None = None
    response: str | None = None


@dataclass
class WarmTotals:
    """What `warm` did. tokens_cached: already in the cache; tokens_scored: positions computed."""

    sequences: int = 0
    tokens: int = 0
    tokens_cached: int = 0
    tokens_scored: int = 0
    tokens_forwarded: int = 0
    blocks_written: int = 0
    tokens_written: int = 0
    bytes_written: int = 0
    cache_errors: int = 0
    seconds: float = 0.0
    writer_id: str = ""
    namespace: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def parse_warm_file(path: Path, *, ids_only: bool) -> list[WarmLine]:
    """Every non-blank line of a warm JSONL file, checked; a UsageError lists the bad lines."""
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    lines: list[WarmLine] = []
    errors: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                lines.append(_parse_line(text, lineno, ids_only=ids_only))
            except UsageError as exc:
                errors.append(f"{path}:{lineno}: {exc}")
    if errors:
        shown = errors[:MAX_REPORTED_LINE_ERRORS]
        more = f"\n  (and {len(errors) - len(shown)} more bad lines)" if len(errors) > len(shown) else ""
        raise UsageError(f"{len(errors)} bad lines in {path}:\n  " + "\n  ".join(shown) + more)
    if not lines:
        raise UsageError(f"--prompts {path}: no sequences (the file is empty)")
    return lines


def _parse_line(text: str, lineno: int, *, ids_only: bool) -> WarmLine:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise UsageError(f"expected a JSON object, got {type(record).__name__}")
    if "ids" in record and "prompt" in record:
        raise UsageError("give either 'ids' or 'prompt', not both")
    if "ids" in record:
        return WarmLine(lineno, ids=_parse_ids(record["ids"]))
    if "prompt" not in record:
        raise UsageError("missing 'ids' (a list of token ids) or 'prompt' (text)")
    if ids_only:
        raise UsageError("a 'prompt' (text) line, but --ids-only was given: every line must give 'ids'")
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise UsageError(f"'prompt' must be a non-empty string, got {prompt!r:.60}")
    if "response" in record and "continuation" in record:
        raise UsageError("give either 'response' or 'continuation', not both")
    response = record.get("response", record.get("continuation"))
    if response is not None and not isinstance(response, str):
        raise UsageError(f"'response'/'continuation' must be a string, got {type(response).__name__}")
    return WarmLine(lineno, prompt=prompt, response=response)


def _parse_ids(value: object) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise UsageError("'ids' must be a non-empty list of token ids")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, int):
            raise UsageError(f"'ids'[{i}] is {x!r}: token ids must be integers")
        if not 0 <= x <= _INT32_MAX:
            raise UsageError(f"'ids'[{i}] = {x} is outside [0, {_INT32_MAX}]")
    return np.asarray(value, dtype=np.int32)


def encode_text(tokenizer: Any, line: WarmLine, fmt: PromptFormat, *, append_eos: bool) -> np.ndarray:
    """Ids of a text line: the prompt exactly as actors encode it (see module docs), response appended."""
    assert line.prompt is not None
    try:
        ids = encode_prompt(tokenizer, line.prompt, fmt)
    except ValueError as exc:  # a chat template or BOS asked for that this tokenizer lacks
        raise UsageError(str(exc)) from None
    if line.response:
        ids += [int(t) for t in tokenizer.encode(line.response, add_special_tokens=False)]
    if append_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise UsageError("--append-eos: the teacher's tokenizer defines no eos_token")
        ids.append(int(eos))
    return np.asarray(ids, dtype=np.int32)


def default_writer_id() -> str:
    """`warm-<host>-<pid>`, with the host reduced to the characters a writer id (a directory) may hold."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "host"
    return f"warm-{host}-{os.getpid()}"


def warm(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    """`opd cache warm`: score every line of `args.prompts` into the cache; returns the exit code."""
    cfg, batch_size, writer_id = _options(cfg, args)
    if not transport.redis_url:  # before reading a large file: the cheapest thing to get wrong
        checked_redis("warm", transport)
    lines = parse_warm_file(Path(args.prompts), ids_only=getattr(args, "ids_only", False))
    seqs = _to_ids(cfg, lines, warm_prompt_format(args), append_eos=getattr(args, "append_eos", False))
    vocab = _config_vocab_size(cfg)
    if vocab is not None:  # before the (possibly long) model load
        _check_vocab(lines, seqs, vocab, Path(args.prompts))
    client = checked_redis("warm", transport)
    if not cfg.cache_enabled:
        note("opd cache warm: note: teacher.cache_enabled is false, so teachers of this config will not read "
              "what warm writes")
    note(f"opd cache warm: {len(seqs)} sequences ({sum(len(s) for s in seqs):,} tokens) from {args.prompts}; "
          f"loading the teacher ({cfg.engine.kind})")
    scorer = _load_scorer(cfg)
    if scorer is None:
        return 1
    vocab = getattr(scorer, "vocab_size", None)
    if vocab is not None:
        _check_vocab(lines, seqs, int(vocab), Path(args.prompts))
    cache = open_cache(cfg, scorer.identity, client, Names(transport.namespace), writer_id)
    totals = WarmTotals(writer_id=writer_id, namespace=cache.namespace)
    try:
        failed = _score_all(cfg, scorer, cache, lines, seqs, batch_size, totals, source=str(args.prompts))
    finally:
        cache.close()
    if failed:
        return 1
    _report(totals, as_json=getattr(args, "json", False))
    if totals.cache_errors:
        report_error("warm", f"{totals.cache_errors} cache lookups or writes failed (see the warnings above); "
                       "the affected sequences are not cached")
        return 1
    return 0


def _options(cfg: TeacherConfig, args: argparse.Namespace) -> tuple[TeacherConfig, int, str]:
    """The teacher config (`--model` applied), batch size and writer id, or a UsageError naming the bad one."""
    if getattr(args, "model", None):
        cfg = cfg.model_copy(update={"model_dir": args.model})
    batch_size = getattr(args, "batch_size", None)
    batch_size = cfg.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if cfg.engine.needs_model_dir and not cfg.model_dir:
        raise UsageError("warm needs the teacher model: --model DIR or teacher.model_dir")
    if cfg.model_dir and not Path(cfg.model_dir).is_dir():
        raise UsageError(f"teacher model dir {cfg.model_dir!r} is not a directory")
    writer_id = getattr(args, "writer_id", None) or default_writer_id()
    try:
        validate_writer_id(writer_id)
    except ValueError as exc:
        raise UsageError(f"--writer-id: {exc}") from None
    return cfg, batch_size, writer_id


def _load_scorer(cfg: TeacherConfig) -> TeacherScorer | None:
    """The teacher's scorer, or None after saying why it could not be loaded (no traceback)."""
    try:
        scorer = make_scorer(cfg)
        _ = scorer.identity  # the SGLang scorer asks its server here
    except Exception as exc:  # not a model dir, unreadable files, unreachable server, out of memory
        where = cfg.engine.server_url or cfg.model_dir
        report_error("warm", f"cannot load the teacher ({cfg.engine.kind}, {where}): {type(exc).__name__}: {exc}")
        return None
    return scorer


def _score_all(cfg: TeacherConfig, scorer: TeacherScorer, cache: TeacherCache, lines: list[WarmLine],
               seqs: list[np.ndarray], batch_size: int, totals: WarmTotals, *, source: str) -> bool:
    """Score `seqs` batch by batch into `cache`, adding to `totals`; True if the scorer failed (said why)."""
    dtype = topk_storage_dtype(cfg)
    started = last = time.perf_counter()
    for first in range(0, len(seqs), batch_size):
        batch = seqs[first : first + batch_size]
        forwarded = scorer.tokens_forwarded
        try:
            full, stats = score_with_cache(scorer, cache, batch, k=cfg.topk, topk_dtype=dtype)
        except Exception as exc:  # the scorer failed (server down, out of memory): say where, keep the rest
            report_error("warm", f"scoring failed on the batch starting at {source}:{lines[first].lineno} "
                           f"({type(exc).__name__}: {exc}); the {totals.sequences} sequences before it are cached")
            return True
        totals.tokens_forwarded += scorer.tokens_forwarded - forwarded
        for seq, f in zip(batch, full, strict=True):
            totals.sequences += 1
            totals.tokens += len(seq)
            totals.tokens_cached += f.cached_upto
            totals.tokens_scored += max(0, len(seq) - max(1, f.cached_upto))
        totals.blocks_written += stats.blocks_written
        totals.tokens_written += stats.tokens_written
        totals.bytes_written += stats.bytes_written
        totals.cache_errors += stats.errors
        now = time.perf_counter()
        totals.seconds = now - started
        if now - last >= PROGRESS_EVERY_S or totals.sequences == len(seqs):
            last = now
            note(f"warm: {totals.sequences:,}/{len(seqs):,} sequences ({100 * totals.sequences / len(seqs):.0f}%), "
                  f"{totals.tokens:,} tokens ({totals.tokens_cached:,} already cached, {totals.tokens_scored:,} scored), "
                  f"{totals.tokens_per_second:,.0f} tok/s")
    return False


def _report(totals: WarmTotals, *, as_json: bool) -> None:
    if as_json:
        print_json(asdict(totals) | {"tokens_per_second": totals.tokens_per_second})
        return
    print(f"warm: {totals.sequences:,} sequences, {totals.tokens:,} tokens in {totals.seconds:.1f}s "
          f"({totals.tokens_per_second:,.0f} tok/s), writer {totals.writer_id}")
    print(table([
        ("already cached (tokens)", f"{totals.tokens_cached:,}"),
        ("scored (tokens)", f"{totals.tokens_scored:,}"),
        ("teacher forward (tokens)", f"{totals.tokens_forwarded:,}"),
        ("written (blocks / tokens)", f"{totals.blocks_written:,} / {totals.tokens_written:,}"),
        ("written (bytes, before compression)", human_bytes(totals.bytes_written)),
        ("cache errors", f"{totals.cache_errors:,}"),
    ]))


def warm_prompt_format(args: argparse.Namespace) -> PromptFormat:
    """The actors' prompt format (`args.prompt_format`, set from the actor section by `opd`), with
    `--no-chat-template` forcing plain text."""
    fmt = getattr(args, "prompt_format", None) or PromptFormat()
    if getattr(args, "no_chat_template", False):
        fmt = PromptFormat(use_chat_template=False, add_bos=fmt.add_bos)
    return fmt


def _to_ids(cfg: TeacherConfig, lines: list[WarmLine], fmt: PromptFormat, *, append_eos: bool) -> list[np.ndarray]:
    """Token ids of every line; text lines need the teacher's tokenizer (teacher.model_dir or --model)."""
    if all(line.ids is not None for line in lines):
        return [line.ids for line in lines if line.ids is not None]
    if not cfg.model_dir:
        raise UsageError("text ('prompt') lines need the teacher's tokenizer: pass --model DIR or set "
                         "teacher.model_dir (or give 'ids' lines)")
    from transformers import AutoTokenizer

    kwargs = {} if cfg.revision is None else {"revision": cfg.revision}
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir, **kwargs)
    out: list[np.ndarray] = []
    for line in lines:
        ids = line.ids if line.ids is not None else encode_text(tokenizer, line, fmt, append_eos=append_eos)
        if not len(ids):
            raise UsageError(f"line {line.lineno}: the text tokenizes to no tokens")
        out.append(ids)
    return out


def _config_vocab_size(cfg: TeacherConfig) -> int | None:
    """The teacher's vocabulary size from its config.json (cheap), or None if it cannot be read there."""
    if not cfg.model_dir:
        return None
    try:
        from transformers import AutoConfig

        kwargs = {} if cfg.revision is None else {"revision": cfg.revision}
        vocab = getattr(AutoConfig.from_pretrained(cfg.model_dir, **kwargs), "vocab_size", None)
    except Exception:  # no or odd config.json: the scorer's own check after loading still applies
        return None
    return int(vocab) if isinstance(vocab, int) else None


def _check_vocab(lines: list[WarmLine], seqs: list[np.ndarray], vocab: int, path: Path) -> None:
    bad = [f"{path}:{line.lineno}: token id {int(s.max())} is outside the teacher's vocabulary [0, {vocab})"
           for line, s in zip(lines, seqs, strict=True) if int(s.max()) >= vocab]
    if bad:
        shown = bad[:MAX_REPORTED_LINE_ERRORS]
        more = f"\n  (and {len(bad) - len(shown)} more)" if len(bad) > len(shown) else ""
        raise UsageError(f"{len(bad)} lines hold ids the teacher cannot score:\n  " + "\n  ".join(shown) + more)
