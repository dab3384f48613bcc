"""Teacher-cache benchmark: hit-read throughput vs teacher recomputation, and bytes per token by k.

    python bench/bench_cache.py                 # tiny teacher built in a temp dir, redis-server started here
    python bench/bench_cache.py --assets runs/tiny --redis-url redis://127.0.0.1:6379/0 --device cuda

WHY these numbers: the cache pays off only if serving a token from Zarr is much cheaper than having the
teacher score it again, and only if it fits on disk. Both are measured in the same run, on the same
tokens, so the ratios are honest for this machine: the teacher row is the baseline for throughput
(ratio = cache tokens/s / teacher tokens/s), the uncompressed payload (4 + k * (4 + topk bytes) per
token) is the baseline for storage (ratio = bytes on disk / payload).

The teacher is `cache.scorers.hf.HFTeacherScorer` on `opd.tiny.build_tiny_assets` (a 0.5M-parameter,
2-layer, 160-wide Llama: a small teacher is the hardest case for a cache, since recomputing is cheap). If either is missing, `teacher_recompute` reports nothing and the table says so; swap in
another scorer there. Teacher outputs are real model outputs when the teacher is there (so the
compression numbers are real), random otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import ops
from cache.store import TeacherCache

Scores3 = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class Row:
    k: int
    teacher_tps: float | None
    write_tps: float
    read_warm_tps: float
    read_first_tps: float
    read_nolru_tps: float
    read_single_tps: float
    bytes_per_token: float
    payload_per_token: int


# ---------------------------------------------------------------------------------------------
# the teacher (baseline)
# ---------------------------------------------------------------------------------------------


def load_teacher(assets: Path | None, tmp: Path, device: str) -> tuple[Any, int] | None:
    """(scorer, vocab size) of the tiny teacher, or None if the teacher code is not there."""
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
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = HFTeacherScorer(asset_paths(root).teacher_dir, device=device)
    return scorer, int(scorer.vocab_size)


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


def synthetic_scores(seqs: list[np.ndarray], k: int, vocab: int) -> list[Scores3]:
    rng = np.random.default_rng(0)
    out = []
    for seq in seqs:
        t = len(seq)
        tlp = np.sort(np.log(rng.dirichlet(np.ones(vocab), size=t))[:, :k], axis=1)[:, ::-1].astype(np.float32)
        out.append((np.log(rng.random(t)).astype(np.float32), rng.integers(0, vocab, (t, k)).astype(np.int32), tlp))
    return out


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of `repeat` runs (least disturbed by the machine)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def bench_cache(root: Path, redis_url: str, seqs: list[np.ndarray], scores: list[Scores3], k: int, args: argparse.Namespace) -> Row:
    kw: dict[str, Any] = {"teacher_identity": "bench-teacher", "k": k, "topk_dtype": args.topk_dtype,
                          "block_size": args.block_size, "redis_prefix": f"bench:k{k}"}
    tokens = sum(len(s) for s in seqs)
    batches = [list(range(i, min(i + args.batch, len(seqs)))) for i in range(0, len(seqs), args.batch)]
    with TeacherCache(root, redis_url, writer_id="bench", **kw) as writer:
        started = time.perf_counter()
        for b in batches:
            writer.put_many([(seqs[i], *scores[i], 0) for i in b])
        write_tps = tokens / (time.perf_counter() - started)

        def read_all(cache: TeacherCache) -> None:
            for b in batches:
                hits = cache.lookup_many([seqs[i] for i in b])
                assert all(h.prefix_len == len(seqs[i]) for h, i in zip(hits, b, strict=True)), "bench: not a full hit"

        read_first_tps = tokens / timed(lambda: read_all(TeacherCache(root, redis_url, **kw)), 3)
        read_nolru_tps = tokens / timed(lambda: read_all(TeacherCache(root, redis_url, read_cache_bytes=0, **kw)), 3)
        warm = TeacherCache(root, redis_url, **kw)
        read_all(warm)  # fill the decoded-chunk LRU
        read_warm_tps = tokens / timed(lambda: read_all(warm), 3)
        read_single_tps = tokens / timed(lambda: [warm.lookup(s) for s in seqs], 3)
    st = ops.stats(root, redis_url, redis_prefix=f"bench:k{k}")
    payload = 4 + k * (4 + np.dtype(args.topk_dtype).itemsize)
    return Row(k, None, write_tps, read_warm_tps, read_first_tps, read_nolru_tps, read_single_tps, st.bytes_per_token,
               payload)


# ---------------------------------------------------------------------------------------------
# redis and main
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(url: str | None, tmp: Path) -> Iterator[str]:
    """The given Redis, or a throwaway redis-server on a free loopback port."""
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench: redis-server not on PATH; pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis

    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("bench: redis-server did not start") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}{unit}"
    return f"{x:.1f}{unit}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.1f}x"


def print_tables(rows: list[Row], args: argparse.Namespace, teacher_where: str, n_tokens: int) -> None:
    print(f"\nteacher cache benchmark: {args.seqs} sequences x {args.len} tokens ({n_tokens} tokens), "
          f"block {args.block_size}, top-k dtype {args.topk_dtype}, batch {args.batch}; teacher: {teacher_where}")
    print("throughput, tokens/s (ratio = cache / teacher recompute of the same tokens in this run)")
    head = ["k", "teacher recompute", "cache write", "read warm", "ratio", "read first", "ratio", "read no-LRU",
            "ratio", "read 1/call", "ratio"]
    table = [[str(r.k), fmt(r.teacher_tps), fmt(r.write_tps)]
             + [c for v in (r.read_warm_tps, r.read_first_tps, r.read_nolru_tps, r.read_single_tps)
                for c in (fmt(v), ratio(v, r.teacher_tps))] for r in rows]
    _print(head, table)
    print("\nstorage, bytes per token on disk (ratio = on disk / uncompressed payload; vs k=0 = on disk / k=0 on disk)")
    base = rows[0].bytes_per_token if rows and rows[0].k == 0 else None
    head = ["k", "payload B/tok", "disk B/tok", "disk/payload", "vs k=0"]
    table = [[str(r.k), str(r.payload_per_token), f"{r.bytes_per_token:.1f}", ratio(r.bytes_per_token, r.payload_per_token),
              ratio(r.bytes_per_token, base)] for r in rows]
    _print(head, table)
    print("\nread warm: decoded-chunk LRU already filled, lookup_many per batch; first: a fresh reader (each chunk "
          "decoded once); no-LRU: LRU off, every lookup decodes its ~1 MiB chunks; 1/call: lookup() per sequence, "
          "warm. Reads verify every block's CRC. Disk bytes include records and zarr metadata. Timings are best of "
          f"2-3 runs on {os.cpu_count()} CPUs; a shared machine makes them noisy.")


def _print(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=128, help="sequences")
    p.add_argument("--len", type=int, default=256, help="tokens per sequence (the tiny teacher takes <= 256)")
    p.add_argument("--ks", type=int, nargs="+", default=[0, 8, 32], help="top-k values")
    p.add_argument("--topk-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="sequences per teacher forward / put_many / lookup_many")
    p.add_argument("--device", default="auto", help="teacher device: auto | cpu | cuda")
    p.add_argument("--assets", type=Path, default=None, help="tiny assets dir to reuse (built if missing)")
    p.add_argument("--redis-url", default=None, help="default: start a throwaway redis-server")
    p.add_argument("--no-teacher", action="store_true", help="skip the recomputation baseline")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp_s, redis_server(args.redis_url, Path(tmp_s)) as url:
        tmp = Path(tmp_s)
        loaded = None if args.no_teacher else load_teacher(args.assets, tmp, args.device)
        teacher, vocab = loaded if loaded is not None else (None, 32_000)
        rng = np.random.default_rng(0)
        seqs = [rng.integers(0, vocab, args.len).astype(np.int32) for _ in range(args.seqs)]
        rows: list[Row] = []
        for k in args.ks:
            if teacher is not None and k > vocab:
                raise SystemExit(f"bench: k={k} exceeds the teacher's vocab ({vocab})")
            teacher_tps, scores = teacher_recompute(teacher, seqs, k, args.batch)
            if scores is None:
                scores = synthetic_scores(seqs, k, vocab)
            row = bench_cache(tmp / f"cache-k{k}", url, seqs, scores, k, args)
            row.teacher_tps = teacher_tps
            rows.append(row)
            print(f"[bench] k={k} done", file=sys.stderr)
        where = "none (synthetic outputs)" if teacher is None else f"tiny HF teacher on {teacher.device}"
        print_tables(rows, args, where, sum(len(s) for s in seqs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
