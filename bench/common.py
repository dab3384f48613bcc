"""What the benchmarks share: a throwaway redis-server, best-of timing, tables, realistic teacher outputs.

WHY realistic top-k outputs matter: how well top-k ids compress (cache) and how long they print (json)
depends on their values. A 54-token vocabulary makes every id one byte of entropy; a real model's top-k
ids are drawn from 32k-152k ids with a heavy-tailed (Zipfian) token frequency. `zipf_topk_ids` draws
each row's k ids without replacement from a Zipf(s) prior over the vocabulary (Plackett-Luce: the same
law as the top-k of the prior's log plus Gumbel noise), with frequency ranks mapped to ids by a random
permutation (a conservative choice: BPE vocabularies number frequent tokens low, which compresses
better). `topk_logprobs` gives each row a descending, normalised logprob profile with a random
sharpness, in full float precision (mantissas are noise, as in a real model's outputs).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# a throwaway redis-server
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(url: str | None, tmp: Path, *, aof: bool = False) -> Iterator[str]:
    """The given Redis, or a redis-server on a free loopback port for the duration (AOF everysec if `aof`,
    as `opd up` and the compose file run it)."""
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench: redis-server not on PATH (apt-get install redis-server); or pass --redis-url")
    port = free_port()
    persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else ["--appendonly", "no"]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
                             *persistence], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis

    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("bench: redis-server did not start") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# timing and tables
# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of `repeat` runs (the least disturbed by a shared machine)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def rate(fn: Callable[[], object], *, min_s: float, repeat: int = 3) -> float:
    """Calls per second of `fn`: best of `repeat` rounds, each calling it for at least `min_s` seconds."""
    fn()  # warm-up
    best = 0.0
    for _ in range(repeat):
        n, started = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_s:
                break
        best = max(best, n / elapsed)
    return best


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}{unit}"
    return f"{x:.1f}{unit}"


def ratio(a: float | None, b: float | None, digits: int = 1) -> str:
    """a / b as `1.5x`; below 0.1, in significant digits (`0.0021x`) rather than rounded to zero."""
    if a is None or not b:
        return "n/a"
    r = a / b
    return f"{r:.2g}x" if 0 < abs(r) < 0.1 else f"{r:.{digits}f}x"


def print_table(head: list[str], rows: list[list[str]]) -> None:
    """A right-aligned plain-text table (what the smoke tests parse)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


# ---------------------------------------------------------------------------------------------
# realistic teacher outputs (see the module docstring)
# ---------------------------------------------------------------------------------------------


def zipf_topk_ids(rng: np.random.Generator, n: int, k: int, vocab: int, *, s: float = 1.0) -> np.ndarray:
    """int32[n, k]: per row, k distinct ids drawn without replacement from a Zipf(s) prior, in draw order."""
    if not 0 <= k <= vocab:
        raise ValueError(f"k={k} must be in [0, vocab={vocab}]")
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** s)
    cdf /= cdf[-1]
    rank_to_id = rng.permutation(vocab).astype(np.int32)
    out = np.empty((n, k), np.int32)
    draws = np.minimum(np.searchsorted(cdf, rng.random((n, 4 * k + 8))), vocab - 1)
    for i in range(n):
        d = draws[i]
        uniq, first = np.unique(d, return_index=True)
        while len(uniq) < k:  # rare: the head of the prior drew too many repeats
            d = np.concatenate([d, np.minimum(np.searchsorted(cdf, rng.random(4 * k + 8)), vocab - 1)])
            uniq, first = np.unique(d, return_index=True)
        out[i] = d[np.sort(first)[:k]]
    return rank_to_id[out]


def topk_logprobs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """float32[n, k]: descending logprobs of a row's top k, with random sharpness and tail mass."""
    logits = np.sort(rng.gumbel(size=(n, k)) * rng.uniform(0.5, 3.0, (n, 1)), axis=1)[:, ::-1]
    tail_mass = rng.uniform(0.01, 0.5, (n, 1))  # probability left to the rest of the vocabulary
    norm = np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return (logits - norm + np.log1p(-tail_mass)).astype(np.float32)


def realistic_scores(rng: np.random.Generator, n: int, k: int, vocab: int, *, s: float = 1.0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(logprobs_N, topk_ids_NK, topk_logprobs_NK, tokens_N) for n positions: each scored token is one of
    its row's top k, drawn by its probability (for k == 0: random ids and logprobs alone)."""
    if k == 0:
        return (np.log(rng.uniform(0.05, 1.0, n)).astype(np.float32), np.zeros((n, 0), np.int32),
                np.zeros((n, 0), np.float32), rng.integers(0, vocab, n, dtype=np.int32))
    ids = zipf_topk_ids(rng, n, k, vocab, s=s)
    tlp = topk_logprobs(rng, n, k)
    p = np.exp(tlp.astype(np.float64))
    pick = (rng.random((n, 1)) * p.sum(axis=1, keepdims=True) > np.cumsum(p, axis=1)).sum(axis=1).clip(0, k - 1)
    rows = np.arange(n)
    return tlp[rows, pick].astype(np.float32), ids, tlp, ids[rows, pick]


def scored_prefix(rng: np.random.Generator, *, prompt: int, response: int, k: int, vocab: int,
                  topk_dtype: str = "float32") -> object:
    """A `ScoredPrefix` as the teacher forwards it: `response` sampled tokens scored with top-k `k`."""
    from protocol.messages import RolloutPrefix, ScoredPrefix

    lp, ids, tlp, tokens = realistic_scores(rng, response, k, vocab)
    rollout = RolloutPrefix(
        prompt_ids_P=rng.integers(0, vocab, prompt, dtype=np.int32), response_ids_R=tokens,
        behaviour_logprobs_R=np.log(rng.uniform(0.05, 1.0, response)).astype(np.float32),
        prompt_index=7, horizon=response, max_new_tokens=response, finished=False, policy_version=3,
        actor_id="actor-0", temperature=1.0, top_p=1.0)
    return ScoredPrefix.from_rollout(rollout, teacher_logprobs_R=lp, topk_ids_RK=ids,
                                     topk_logprobs_RK=tlp.astype(topk_dtype), teacher_id="teacher-0",
                                     cached_tokens=0, scored_tokens=response)
