"""`opd cache ...`: operate the teacher cache from a shell (stats, verify, rebuild-index, evict, warm).

`opd/commands.py` loads and validates the config, then calls `run`. The cache root is
`teacher.cache_dir`; the Redis index lives under `<transport.namespace>:cache`, the prefix every
teacher of that namespace uses, so these commands see exactly what the running teachers see.

Exit codes, and why three: scripts (and CI) must tell "the cache is damaged" from "you asked
wrongly". 0: done, nothing wrong. 1: `verify` found problems, or the operation failed (Redis
unreachable, a cache write failed). 2: bad usage: a missing or wrong setting (no Redis URL, no
eviction budget, no cache at `teacher.cache_dir`) or bad input lines; the message names what to fix.

`warm` (offline teacher caching) scores a dataset ahead of training through
`cache.teacher.score_with_cache`, the very code a live teacher runs, with the same namespace, Redis
prefix and block size, so a warmed entry is indistinguishable from one a teacher stored. Input lines:

- `{"ids": [1, 17, ...]}`: the exact token ids (prompt + response). Preferred: cache keys are
  token blocks, and only equal ids hit.
- `{"prompt": "...", "response": "..."}` (or `"continuation"`, as the tiny prompt files have):
  text, the prompt encoded by `protocol.prompts.encode_prompt`, the very function the actors use,
  with the actor's settings (`actor.use_chat_template`, `actor.add_bos`; `--no-chat-template`
  forces plain text), then the response appended as plain tokens (+ EOS with `--append-eos`).
  Prompt blocks therefore match what actors send; a text response hits only where the student's
  sampled ids equal this tokenization. `--ids-only` refuses text lines.

The whole file is read and checked before the model loads, so a bad line costs seconds, not a
model load; sequences are held in memory as int32 (4 bytes per token).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis

from cache.config import TeacherConfig
from protocol.config import TransportConfig
from protocol.names import Names
from protocol.prompts import PromptFormat, encode_prompt
from protocol.streams import connect

MAX_REPORTED_LINE_ERRORS = 10
PROGRESS_EVERY_S = 2.0
_INT32_MAX = int(np.iinfo(np.int32).max)


class UsageError(ValueError):
    """Bad command line, config or input: exit code 2, with a message naming what to fix."""


def run(command: str, cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    """Run `opd cache <command>`; returns the process exit code (see module docs)."""
    handlers: dict[str, Callable[[TeacherConfig, TransportConfig, argparse.Namespace], int]] = {
        "stats": _stats, "verify": _verify, "rebuild-index": _rebuild_index, "evict": _evict, "warm": _warm,
    }
    handler = handlers.get(command)
    if handler is None:
        _error(command, f"unknown cache command {command!r} (known: {', '.join(handlers)})")
        return 2
    from cache.shards import CacheError

    try:
        return handler(cfg, transport, args)
    except UsageError as exc:
        _error(command, str(exc))
        return 2
    except redis.RedisError as exc:
        _error(command, f"Redis at {redact_url(transport.redis_url or '')} failed: {type(exc).__name__}: {exc}")
        return 1
    except CacheError as exc:
        _error(command, str(exc))
        return 1


# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------


def _error(command: str, message: str) -> None:
    print(f"opd cache {command}: error: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def redact_url(url: str) -> str:
    """The URL without its password, so an error message never leaks it into logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _redis(command: str, transport: TransportConfig) -> redis.Redis:
    """A checked Redis client (one PING), or a UsageError when no URL is configured."""
    if not transport.redis_url:
        raise UsageError(f"opd cache {command} needs transport.redis_url (or OPD_REDIS_URL), "
                         "e.g. --set transport.redis_url=redis://127.0.0.1:6379/0")
    client = connect(transport.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise redis.ConnectionError(f"cannot reach it ({exc})") from None
    return client


def _existing_root(cfg: TeacherConfig) -> str:
    """teacher.cache_dir, checked to hold a teacher cache (commands other than warm never create one)."""
    from cache.shards import CacheRoot

    try:
        CacheRoot(cfg.cache_dir, create=False)
    except FileNotFoundError as exc:
        raise UsageError(f"teacher.cache_dir={cfg.cache_dir!r}: {exc}; point it at a cache a teacher or "
                         "`opd cache warm` wrote") from None
    except ValueError as exc:
        raise UsageError(f"teacher.cache_dir={cfg.cache_dir!r}: {exc}") from None
    return cfg.cache_dir


def _prefix(transport: TransportConfig) -> str:
    return Names(transport.namespace).key("cache")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, like du -h)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts > 0 else "never"


# ---------------------------------------------------------------------------------------------
# stats / verify / rebuild-index / evict
# ---------------------------------------------------------------------------------------------


def _stats(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache import ops

    root = _existing_root(cfg)
    client = _redis("stats", transport)
    st = ops.stats(root, client, redis_prefix=_prefix(transport))
    if getattr(args, "json", False):
        _print_json({"root": root, "redis_prefix": _prefix(transport), **st.to_dict()})
        return 0
    c = st.counters
    looked = c["hit_tokens"] + c["miss_tokens"]
    rows = [
        ("entries (indexed)", f"{st.entries:,}"),
        ("tokens (indexed)", f"{st.indexed_tokens:,}"),
        ("entries (in shards)", f"{st.stored_entries:,}"),
        ("tokens (in shards)", f"{st.stored_tokens:,}"),
        ("shards", f"{st.shards:,} ({st.sealed_shards:,} sealed)"),
        ("bytes on disk", f"{human_bytes(st.bytes_on_disk)} ({st.bytes_on_disk:,} B)"),
        ("bytes per token", f"{st.bytes_per_token:,.1f}"),
        ("hit rate", f"{100 * st.hit_rate:.1f}% ({c['hit_tokens']:,} of {looked:,} looked-up tokens)"),
    ]
    rows += [(f"counter {k}", f"{v:,}") for k, v in sorted(c.items())]
    print(f"teacher cache {root} (redis prefix {_prefix(transport)})")
    print(_table(rows))
    return 0


def _verify(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache import ops

    root = _existing_root(cfg)
    client = _redis("verify", transport)
    report = ops.verify(root, client, redis_prefix=_prefix(transport), check_data=not getattr(args, "quick", False),
                        repair=getattr(args, "repair", False))
    if getattr(args, "json", False):
        _print_json(report.to_dict())
        return 0 if report.ok else 1
    print(report.summary())
    bad_shards = Tally(b.shard for b in report.bad)
    bad_shards.update(d.shard for d in report.dangling if d.shard != "?")
    for shard, n in sorted(bad_shards.items()):
        print(f"  bad shard {shard}: {n} bad or dangling entries")
    for shard in report.incomplete_shards:
        print(f"  incomplete shard {shard} (its writer died creating it; holds nothing, not a problem)")
    if report.unindexed:
        print(f"  {len(report.unindexed)} good records have no index field (not a problem; "
              "`opd cache rebuild-index` indexes them)")
    if getattr(args, "repair", False):
        print(f"  repaired {report.repaired} index fields")
    return 0 if report.ok else 1


def _rebuild_index(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache import ops

    root = _existing_root(cfg)
    client = _redis("rebuild-index", transport)
    report = ops.rebuild_index(root, client, redis_prefix=_prefix(transport),
                               check_data=not getattr(args, "quick", False))
    if getattr(args, "json", False):
        _print_json(report.to_dict())
        return 0
    print(f"rebuild-index: {report.shards} shards, {report.records} records")
    print(_table([
        ("index fields added", f"{report.added:,}"),
        ("replaced (pointed at bad/missing data)", f"{report.replaced:,}"),
        ("removed (no good record behind them)", f"{report.removed:,}"),
        ("already correct", f"{report.kept:,}"),
        ("bad entries not indexed", f"{report.bad_skipped:,}"),
    ]))
    return 0


def _evict(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache import ops

    if cfg.cache_budget_bytes is None:
        raise UsageError("opd cache evict needs a budget: set teacher.cache_budget_bytes in the config or pass "
                         "--set teacher.cache_budget_bytes=BYTES (e.g. 50000000000 for 50 GB)")
    root = _existing_root(cfg)
    client = _redis("evict", transport)
    report = ops.evict(root, client, cfg.cache_budget_bytes, redis_prefix=_prefix(transport),
                       dry_run=getattr(args, "dry_run", False))
    if getattr(args, "json", False):
        _print_json(report.to_dict())
        return 0
    verb = "would evict" if report.dry_run else "evicted"
    print(f"evict: budget {human_bytes(report.budget_bytes)}: {human_bytes(report.bytes_before)} before, "
          f"{human_bytes(report.bytes_after)} after; {verb} {len(report.removed)} shards")
    for e in report.removed:
        print(f"  {verb} {e.shard}: {human_bytes(e.nbytes)}, last hit {_when(e.last_hit)}, "
              f"{e.index_fields_removed} index fields removed")
    for sid in report.active_kept:
        print(f"  kept {sid}: active shard of a live writer")
    if report.over_budget:
        print(f"  still over budget by {human_bytes(report.bytes_after - report.budget_bytes)}: only live writers' "
              "active shards are left (they are never removed)")
    return 0


# ---------------------------------------------------------------------------------------------
# warm
# ---------------------------------------------------------------------------------------------


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


def _warm(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache.teacher import make_scorer, open_cache, score_with_cache, topk_storage_dtype

    if getattr(args, "model", None):
        cfg = cfg.model_copy(update={"model_dir": args.model})
    batch_size = getattr(args, "batch_size", None)
    batch_size = cfg.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if cfg.engine == "hf" and not cfg.model_dir:
        raise UsageError("warm needs the teacher model: --model DIR or teacher.model_dir")
    if cfg.model_dir and not Path(cfg.model_dir).is_dir():
        raise UsageError(f"teacher model dir {cfg.model_dir!r} is not a directory")
    if cfg.engine == "sglang" and not cfg.sglang_url:
        raise UsageError("teacher.engine is 'sglang' but teacher.sglang_url is not set")
    writer_id = getattr(args, "writer_id", None) or default_writer_id()
    from cache.shards import validate_writer_id

    try:
        validate_writer_id(writer_id)
    except ValueError as exc:
        raise UsageError(f"--writer-id: {exc}") from None
    if not transport.redis_url:  # before reading a large file: the cheapest thing to get wrong
        _redis("warm", transport)
    lines = parse_warm_file(Path(args.prompts), ids_only=getattr(args, "ids_only", False))
    seqs = _to_ids(cfg, lines, warm_prompt_format(args), append_eos=getattr(args, "append_eos", False))
    vocab = _config_vocab_size(cfg)
    if vocab is not None:  # before the (possibly long) model load
        _check_vocab(lines, seqs, vocab, Path(args.prompts))
    client = _redis("warm", transport)
    if not cfg.cache_enabled:
        _note("opd cache warm: note: teacher.cache_enabled is false, so teachers of this config will not read "
              "what warm writes")
    _note(f"opd cache warm: {len(seqs)} sequences ({sum(len(s) for s in seqs):,} tokens) from {args.prompts}; "
          f"loading the teacher ({cfg.engine})")
    try:
        scorer = make_scorer(cfg)
        identity = scorer.identity  # the SGLang scorer asks its server here
    except Exception as exc:  # not a model dir, unreachable server, out of memory: name it, no traceback
        where = cfg.sglang_url if cfg.engine == "sglang" else cfg.model_dir
        _error("warm", f"cannot load the teacher ({cfg.engine}, {where}): {type(exc).__name__}: {exc}")
        return 1
    vocab = getattr(scorer, "vocab_size", None)
    if vocab is not None:
        _check_vocab(lines, seqs, int(vocab), Path(args.prompts))
    names = Names(transport.namespace)
    cache = open_cache(cfg, identity, client, names, writer_id)
    totals = WarmTotals(writer_id=writer_id, namespace=cache.namespace)
    dtype = topk_storage_dtype(cfg)
    started = last = time.perf_counter()
    try:
        for first in range(0, len(seqs), batch_size):
            batch = seqs[first : first + batch_size]
            forwarded = scorer.tokens_forwarded
            try:
                full, stats = score_with_cache(scorer, cache, batch, k=cfg.topk, topk_dtype=dtype)
            except Exception as exc:  # the scorer failed (server down, out of memory): say where, keep the rest
                _error("warm", f"scoring failed on the batch starting at {args.prompts}:{lines[first].lineno} "
                               f"({type(exc).__name__}: {exc}); the {totals.sequences} sequences before it are cached")
                return 1
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
                _note(f"warm: {totals.sequences:,}/{len(seqs):,} sequences ({100 * totals.sequences / len(seqs):.0f}%), "
                      f"{totals.tokens:,} tokens ({totals.tokens_cached:,} already cached, {totals.tokens_scored:,} scored), "
                      f"{totals.tokens_per_second:,.0f} tok/s")
    finally:
        cache.close()
    if getattr(args, "json", False):
        _print_json(asdict(totals) | {"tokens_per_second": totals.tokens_per_second})
    else:
        print(f"warm: {totals.sequences:,} sequences, {totals.tokens:,} tokens in {totals.seconds:.1f}s "
              f"({totals.tokens_per_second:,.0f} tok/s), writer {writer_id}")
        print(_table([
            ("already cached (tokens)", f"{totals.tokens_cached:,}"),
            ("scored (tokens)", f"{totals.tokens_scored:,}"),
            ("teacher forward (tokens)", f"{totals.tokens_forwarded:,}"),
            ("written (blocks / tokens)", f"{totals.blocks_written:,} / {totals.tokens_written:,}"),
            ("written (bytes, before compression)", human_bytes(totals.bytes_written)),
            ("cache errors", f"{totals.cache_errors:,}"),
        ]))
    if totals.cache_errors:
        _error("warm", f"{totals.cache_errors} cache lookups or writes failed (see the warnings above); "
                       "the affected sequences are not cached")
        return 1
    return 0


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
