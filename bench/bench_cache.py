"""Teacher-cache benchmark: hit reads against teacher recomputation, and bytes per token by vocabulary and k.

    python bench/bench_cache.py                 # tiny teachers built in a temp dir, redis-server started here
    python bench/bench_cache.py --quick         # a few short sequences (smoke test)
    python bench/bench_cache.py --assets runs/tiny --redis-url redis://127.0.0.1:6379/0 --device cuda

WHY these numbers: the cache pays off only if serving a token from Zarr is much cheaper than having the
teacher score it again, and only if it fits on disk. Both are measured in the same run, on the same
tokens, so the ratios are honest for this machine: the teacher row is the baseline for throughput
(ratio = cache tokens/s / teacher tokens/s), the uncompressed payload (4 + k * (4 + topk bytes) per
token) is the baseline for storage (ratio = bytes on disk / payload).

Two kinds of vocabulary (`--vocabs`):
- `tiny`: the trained 0.5M-parameter teacher of `opd.tiny.build_tiny_assets` (2 layers, 160 wide,
  54-token vocabulary); its real outputs are stored. A small teacher is the hardest case for a cache,
  since recomputing is cheap; but 54 ids make top-k ids compress unrealistically well.
- a number (32000, 152064): a teacher of the same shape with that vocabulary (untrained: it is only
  the recomputation baseline, scoring `--teacher-seqs` of the sequences), and realistic stored outputs
  from `bench.common.realistic_scores` (Zipfian top-k ids over the whole vocabulary, full-precision
  descending logprobs), at `--realistic-ks`. These give the bytes per token a real teacher's cache takes.

Both top-k dtypes are sized on disk (`--storage-dtypes`); the throughput rows use `--topk-dtype`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fmt, print_table, ratio, realistic_scores, redis_server, timed
from cache import ops
from cache.layout import COMPRESSIONS, LOGPROBS, RECORDS, SHARDS, TOPK_IDS, TOPK_LOGPROBS
from cache.store import TeacherCache

Scores3 = tuple[np.ndarray, np.ndarray, np.ndarray]
TINY = "tiny"
GOAL_K, GOAL_BYTES = 32, 200  # issue 11: at most 200 B/token at k=32


@dataclass
class Row:
    vocab: str
    k: int
    topk_dtype: str
    bytes_per_token: float
    payload_per_token: int
    parts: dict[str, float]
    teacher_tps: float | None = None
    write_tps: float | None = None
    reads: dict[str, float] = field(default_factory=dict)  # read mode -> tokens/s (empty: storage only)


# ---------------------------------------------------------------------------------------------
# the teachers (baseline)
# ---------------------------------------------------------------------------------------------


def load_tiny_teacher(assets: Path | None, tmp: Path, device: str) -> tuple[Any, int] | None:
    """(scorer, vocab size) of the trained tiny teacher, or None if the teacher code is not there."""
    try:
        from cache.scorers.hf import HFTeacherScorer
        from opd.tiny import asset_paths, build_tiny_assets
    except ImportError as exc:
        print(f"[bench] no teacher ({exc}); recomputation not measured", file=sys.stderr)
        return None
    root = assets if assets is not None else tmp / "tiny"
    if not (root / ".complete").exists():
        print(f"[bench] building tiny assets in {root} (training steps cut short: timing only)", file=sys.stderr)
        build_tiny_assets(root, seed=0, teacher_steps=20, student_warmup_steps=0)
    scorer = HFTeacherScorer(asset_paths(root).teacher_dir, device=_device(device))
    return scorer, int(scorer.vocab_size)


def load_wide_teacher(vocab: int, tmp: Path, device: str, max_batch_tokens: int) -> Any | None:
    """The tiny teacher's shape with a `vocab`-id output layer, untrained (a timing baseline only)."""
    try:
        import torch
        from transformers import LlamaForCausalLM

        from cache.scorers.hf import HFTeacherScorer
        from opd.tiny import build_tokenizer, make_config, quiet_progress_bars
    except ImportError as exc:
        print(f"[bench] no teacher ({exc}); recomputation not measured", file=sys.stderr)
        return None
    path = tmp / f"teacher-{vocab}"
    with torch.random.fork_rng(devices=[]), quiet_progress_bars():
        torch.manual_seed(0)
        LlamaForCausalLM(make_config(vocab, hidden=160, layers=2, heads=4, intermediate=320)).save_pretrained(path)
        build_tokenizer().save_pretrained(path)  # the scorer hashes a tokenizer into its identity
    return HFTeacherScorer(path, device=_device(device), max_batch_tokens=max_batch_tokens)


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def teacher_recompute(teacher: Any | None, seqs: list[np.ndarray], k: int, batch: int) -> tuple[float | None, list[Scores3] | None]:
    """LEAD: the recomputation baseline. Tokens/s of the teacher scoring every position of `seqs`.

    Returns (tokens/s, per-sequence full-length outputs aligned to positions 0..T-1) or (None, None)
    when no teacher is available. Any `TeacherScorer` works here.
    """
    if teacher is None:
        return None, None
    teacher.score(seqs[:batch], [1] * min(batch, len(seqs)), k)  # warm-up (allocations, kernels)
    out: list[Scores3] = []

    def run() -> None:
        out.clear()
        for i in range(0, len(seqs), batch):
            part = seqs[i : i + batch]
            for s in teacher.score(part, [1] * len(part), k):
                lp = np.concatenate([[np.nan], s.logprobs_R]).astype(np.float32)
                ids = np.concatenate([np.zeros((1, k), np.int32), s.topk_ids_RK])
                tlp = np.concatenate([np.zeros((1, k), np.float32), s.topk_logprobs_RK])
                out.append((lp, ids, tlp))

    return sum(len(s) for s in seqs) / timed(run, 2), out


def synthetic(vocab: int, k: int, n_seqs: int, length: int, seed: int) -> tuple[list[np.ndarray], list[Scores3]]:
    """Sequences of sampled tokens with realistic scores (`bench.common.realistic_scores`); position 0 of
    each holds what a teacher leaves there (NaN logprob, ids 0)."""
    lp, ids, tlp, tokens = realistic_scores(np.random.default_rng(seed), n_seqs * length, k, vocab)
    seqs, scores = [], []
    for i in range(n_seqs):
        sl = slice(i * length, (i + 1) * length)
        a, b, c = lp[sl].copy(), ids[sl].copy(), tlp[sl].copy()
        a[0], b[0], c[0] = np.nan, 0, 0.0
        seqs.append(tokens[sl].astype(np.int32))
        scores.append((a, b, c))
    return seqs, scores


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


def array_bytes_per_token(root: Path, tokens: int) -> dict[str, float]:
    """Bytes per token on disk of each shard array, and of the rest (records, zarr metadata)."""
    sizes = dict.fromkeys((LOGPROBS, TOPK_IDS, TOPK_LOGPROBS, RECORDS), 0)
    total = 0
    for dirpath, _dirs, files in os.walk(root / SHARDS):
        n = sum(os.stat(os.path.join(dirpath, f)).st_size for f in files)
        total += n
        for name in sizes:
            if f"{os.sep}{name}{os.sep}" in f"{dirpath}{os.sep}":
                sizes[name] += n
    parts = {name: b / tokens for name, b in sizes.items()}
    parts["rest"] = (total - sum(sizes.values())) / tokens
    return parts


def bench_cache(root: Path, redis_url: str, seqs: list[np.ndarray], scores: list[Scores3], k: int, vocab: str,
                dtype: str, args: argparse.Namespace, *, reads: bool) -> Row:
    """Write every sequence, size it on disk and, with `reads`, time every read mode."""
    kw: dict[str, Any] = {"teacher_identity": f"bench-teacher-{vocab}", "k": k, "topk_dtype": dtype,
                          "block_size": args.block_size, "compression": args.compression,
                          "redis_prefix": f"bench:{vocab}:k{k}:{dtype}"}
    tokens = sum(len(s) for s in seqs)
    batches = [list(range(i, min(i + args.batch, len(seqs)))) for i in range(0, len(seqs), args.batch)]
    with TeacherCache(root, redis_url, writer_id="bench", **kw) as writer:
        started = time.perf_counter()
        for b in batches:
            writer.put_many([(seqs[i], *scores[i], 0) for i in b])
        write_tps = tokens / (time.perf_counter() - started)
    st = ops.stats(root, redis_url, redis_prefix=kw["redis_prefix"])
    row = Row(vocab, k, dtype, st.bytes_per_token, 4 + k * (4 + np.dtype(dtype).itemsize),
              array_bytes_per_token(root, st.stored_tokens), write_tps=write_tps)
    if not reads:
        return row

    def read_all(cache: TeacherCache) -> None:
        for b in batches:
            hits = cache.lookup_many([seqs[i] for i in b])
            assert all(h.prefix_len == len(seqs[i]) for h, i in zip(hits, b, strict=True)), "bench: not a full hit"

    row.reads["first"] = tokens / timed(lambda: read_all(TeacherCache(root, redis_url, **kw)), args.repeat)
    row.reads["no-LRU"] = tokens / timed(lambda: read_all(TeacherCache(root, redis_url, read_cache_bytes=0, **kw)),
                                         args.repeat)
    warm = TeacherCache(root, redis_url, **kw)
    read_all(warm)  # fill the decoded-chunk LRU
    row.reads["warm"] = tokens / timed(lambda: read_all(warm), args.repeat)
    row.reads["1/call"] = tokens / timed(lambda: [warm.lookup(s) for s in seqs], args.repeat)
    return row


def bench_vocab(vocab: str, url: str, tmp: Path, args: argparse.Namespace) -> list[Row]:
    """Every k of one vocabulary: the teacher baseline, then the cache at each top-k dtype."""
    rows: list[Row] = []
    if vocab == TINY:
        loaded = None if args.no_teacher else load_tiny_teacher(args.assets, tmp, args.device)
        teacher, n_vocab = loaded if loaded is not None else (None, 54)
        rng = np.random.default_rng(0)
        seqs = [rng.integers(0, n_vocab, args.len).astype(np.int32) for _ in range(args.seqs)]
        ks = args.ks
    else:
        n_vocab = int(vocab)
        teacher = None if args.no_teacher else load_wide_teacher(n_vocab, tmp, args.device, args.len * args.teacher_batch)
        ks = args.realistic_ks
    for k in ks:
        if vocab == TINY:
            if teacher is not None and k > n_vocab:
                raise SystemExit(f"bench: k={k} exceeds the teacher's vocab ({n_vocab})")
            teacher_tps, scores = teacher_recompute(teacher, seqs, k, args.batch)
            if scores is None:  # no teacher: realistic outputs over the tiny vocabulary
                seqs, scores = synthetic(n_vocab, k, args.seqs, args.len, seed=k)
        else:
            seqs, scores = synthetic(n_vocab, k, args.seqs, args.len, seed=k)
            teacher_tps, _ = teacher_recompute(teacher, seqs[: args.teacher_seqs], k, args.teacher_batch)
        for dtype in dict.fromkeys([args.topk_dtype, *args.storage_dtypes]) if k else [args.topk_dtype]:
            row = bench_cache(tmp / f"cache-{vocab}-k{k}-{dtype}", url, seqs, scores, k, vocab, dtype, args,
                              reads=dtype == args.topk_dtype)
            row.teacher_tps = teacher_tps if row.reads else None
            rows.append(row)
        print(f"[bench] vocab {vocab} k={k} done", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------
# report and main
# ---------------------------------------------------------------------------------------------

READ_MODES = ("warm", "first", "no-LRU", "1/call")


def print_tables(rows: list[Row], args: argparse.Namespace, n_tokens: int, device: str) -> None:
    print(f"\nteacher cache benchmark: {args.seqs} sequences x {args.len} tokens ({n_tokens} tokens), block "
          f"{args.block_size}, batch {args.batch}, compression {args.compression}; teachers on {device} "
          f"({args.threads} torch threads); {os.cpu_count()} CPUs")
    print(f"throughput, tokens/s, top-k dtype {args.topk_dtype} (ratio = cache / teacher recompute of the same "
          "tokens in this run)")
    head = ["vocab", "k", "teacher recompute", "cache write"] + [c for m in READ_MODES for c in (f"read {m}", "ratio")]
    print_table(head, [[r.vocab, str(r.k), fmt(r.teacher_tps), fmt(r.write_tps)]
                       + [c for m in READ_MODES for c in (fmt(r.reads[m]), ratio(r.reads[m], r.teacher_tps))]
                       for r in rows if r.reads])
    print("\nstorage, bytes per token on disk (disk/payload = on disk / uncompressed payload; then per array; "
          f"goal: <= {GOAL_BYTES} B/token at k={GOAL_K})")
    head = ["vocab", "k", "top-k dtype", "payload B/tok", "disk B/tok", "disk/payload", "logprobs", "top-k ids",
            "top-k logprobs", "records+meta", "goal"]
    print_table(head, [[r.vocab, str(r.k), r.topk_dtype, str(r.payload_per_token), f"{r.bytes_per_token:.1f}",
                        ratio(r.bytes_per_token, r.payload_per_token, 2)]
                       + [f"{r.parts[n]:.1f}" for n in (LOGPROBS, TOPK_IDS, TOPK_LOGPROBS)]
                       + [f"{r.parts[RECORDS] + r.parts['rest']:.1f}",
                          ("met" if r.bytes_per_token <= GOAL_BYTES else "MISSED") if r.k == GOAL_K else ""]
                       for r in rows])
    print("\nread warm: decoded-chunk LRU already filled, lookup_many per batch; first: a fresh reader (each chunk "
          "decoded once); no-LRU: LRU off, every lookup decodes its ~1 MiB chunks; 1/call: lookup() per sequence, "
          f"warm. Reads verify every block's CRC. Timings are best of {args.repeat} runs; a shared machine makes "
          f"them noisy. vocab {TINY}: the trained tiny teacher's own outputs (54 ids); numbers: realistic Zipfian "
          f"top-k outputs, the teacher (same shape, that output layer) timed on {args.teacher_seqs} sequences.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=128, help="sequences")
    p.add_argument("--len", type=int, default=256, help="tokens per sequence (the tiny teacher takes <= 256)")
    p.add_argument("--vocabs", nargs="+", default=[TINY, "32000", "152064"],
                   help=f"'{TINY}' (the trained tiny teacher) and/or vocabulary sizes (realistic synthetic outputs)")
    p.add_argument("--ks", type=int, nargs="+", default=[0, 8, 32], help=f"top-k values for vocab '{TINY}'")
    p.add_argument("--realistic-ks", type=int, nargs="+", default=[32], help="top-k values for numeric vocabs")
    p.add_argument("--topk-dtype", default="float32", choices=["float16", "float32"],
                   help="top-k dtype of the throughput rows (teacher.topk_dtype; float32 is its default)")
    p.add_argument("--storage-dtypes", nargs="*", default=["float16", "float32"], choices=["float16", "float32"],
                   help="top-k dtypes also sized on disk (write only)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--compression", default="blosc-lz4", choices=list(COMPRESSIONS),
                   help="TeacherCache(compression=); teachers use its default, blosc-lz4")
    p.add_argument("--batch", type=int, default=16, help="sequences per teacher forward / put_many / lookup_many")
    p.add_argument("--teacher-seqs", type=int, default=8, help="sequences the wide-vocabulary teachers score")
    p.add_argument("--teacher-batch", type=int, default=4, help="sequences per wide-vocabulary forward (memory)")
    p.add_argument("--repeat", type=int, default=2, help="timing runs per read mode (best kept)")
    p.add_argument("--device", default="auto", help="teacher device: auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the teachers (1: a shared machine)")
    p.add_argument("--assets", type=Path, default=None, help="tiny assets dir to reuse (built if missing)")
    p.add_argument("--redis-url", default=None, help="default: start a throwaway redis-server")
    p.add_argument("--no-teacher", action="store_true", help="skip the recomputation baselines")
    p.add_argument("--quick", action="store_true", help="a few short sequences, small vocabularies (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.seqs, args.len, args.repeat, args.teacher_seqs = 4, 48, 1, 2
        args.vocabs = [TINY, "1000"]
    if not args.no_teacher:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp_s, redis_server(args.redis_url, Path(tmp_s)) as url:
        rows = [r for vocab in args.vocabs for r in bench_vocab(vocab, url, Path(tmp_s), args)]
    print_tables(rows, args, args.seqs * args.len, "none" if args.no_teacher else _device(args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
