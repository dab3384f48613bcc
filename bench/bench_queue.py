"""Queue benchmark: prefixes per second through the real `StreamQueue`, against `redis-benchmark` XADD.

    python bench/bench_queue.py                  # redis-server (AOF everysec) started here, ~1 minute
    python bench/bench_queue.py --quick          # a few small messages (smoke test)

WHY: every prefix crosses Redis twice (actor -> teacher, teacher -> learner); the pipeline's message
rate per stream is bounded by what one Redis accepts. The ceiling is `redis-benchmark`'s pipelined
XADD rate (`-c 1 -P 16`) with the same payload size on the same server, measured in the same run
just before each row. What the rows measure, all with the real `protocol.streams.StreamQueue` on
real messages (`bench.common.scored_prefix`: prompt 256, response 2048 tokens, top-k 32 of a
152k-id vocabulary, float32 top-k logprobs by default, encoded by `protocol.codec`):

- publish only: one producer process, `publish()` per prefix with its ledger outcome (one round trip each);
- publish_many: the same, `publish_many()` per `--batch` prefixes (one round trip per batch, as an actor
  publishes its generation batch);
- read + ack only: one consumer process on a pre-filled stream, `read(count=--batch)` then one `ack()`
  per batch with the ledger's terminal outcome (as the learner settles);
- publish -> read -> ack: both processes at once (pipelined: the consumer reads batches while the
  producer publishes them with `publish_many`), from the first publish to the last ack;
- teacher hop: rollouts published by one process, read and `forward()`ed as scored prefixes by a
  second, read and acknowledged by a third: the full actor -> teacher -> learner path of the queue.
  Its ceiling is one rollout XADD plus one scored XADD per prefix (1 / (1/x_rollout + 1/x_scored)).

The payload handed to redis-benchmark has the encoded message's size but no NUL bytes: `-x` reads
its last argument from stdin and stops at the first NUL, and Redis stores a value as opaque bytes, so
only the size matters to it. Each row runs on an empty database (FLUSHDB before it).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import fmt, print_table, ratio, redis_server, scored_prefix
from protocol import ledger
from protocol.messages import RolloutPrefix, ScoredPrefix, encode
from protocol.names import Names
from protocol.streams import StreamQueue, connect

CTX = mp.get_context("fork")  # children build their own Redis clients after the fork


@dataclass
class Row:
    name: str
    payload: str
    n: int
    seconds: float
    ceiling_ps: float
    payload_bytes: int

    @property
    def per_s(self) -> float:
        return self.n / self.seconds


def make_messages(args: argparse.Namespace) -> tuple[RolloutPrefix, ScoredPrefix]:
    scored: ScoredPrefix = scored_prefix(np.random.default_rng(0), prompt=args.prompt, response=args.response,
                                         k=args.k, vocab=args.vocab, topk_dtype=args.topk_dtype)  # type: ignore[assignment]
    rollout = RolloutPrefix(**{f.name: getattr(scored, f.name) for f in dataclasses.fields(RolloutPrefix)})
    return rollout, scored


# ---------------------------------------------------------------------------------------------
# the ceiling: redis-benchmark
# ---------------------------------------------------------------------------------------------


def xadd_ceiling(url: str, size: int, n: int, tmp: Path) -> float:
    """redis-benchmark's XADD/s of a `size`-byte value (pipelined 16 deep, one client; best of 3 runs)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise SystemExit("bench: redis-benchmark not on PATH (apt-get install redis-tools)")
    payload = tmp / f"payload-{size}.bin"
    payload.write_bytes(np.random.default_rng(1).integers(1, 256, size, dtype=np.uint8).tobytes())
    port = str(redis.Redis.from_url(url).connection_pool.connection_kwargs["port"])
    best = 0.0
    for _ in range(3):  # best of 3: a shared machine disturbs a sub-second run
        with payload.open("rb") as stdin:
            out = subprocess.run([binary, "-p", port, "-n", str(n), "-c", "1", "-P", "16", "--csv", "-x",
                                  "XADD", "bench:xadd", "MAXLEN", "~", "256", "*", "m"],
                                 stdin=stdin, capture_output=True, text=True, timeout=300, check=True).stdout
        line = next(x for x in out.splitlines() if x.startswith('"XADD'))
        best = max(best, float(line.split('","')[1]))
    redis.Redis.from_url(url).delete("bench:xadd")
    return best


# ---------------------------------------------------------------------------------------------
# the roles, one process each
# ---------------------------------------------------------------------------------------------


def _queue(url: str, stream: str, names: Names, consumer: str, expect: type | None) -> StreamQueue:
    return StreamQueue(connect(url), stream, names=names, consumer=consumer, expect=expect, high_water=1 << 30)


def producer(url: str, names: Names, message: RolloutPrefix, n: int, many: int, go: Any, out: Any) -> None:
    """`publish()` per prefix, or (`many` > 0) `publish_many()` per `many` prefixes."""
    q = _queue(url, names.rollouts, names, "producer", None)
    go.wait()
    started = time.perf_counter()
    if many:
        for i in range(0, n, many):
            batch = [dataclasses.replace(message, id=uuid.uuid4().hex) for _ in range(min(many, n - i))]
            q.publish_many(batch, ledger_outcome=ledger.PRODUCED)
    else:
        for _ in range(n):
            message.id = uuid.uuid4().hex
            q.publish(message, ledger_outcome=ledger.PRODUCED)
    out.put(("producer", time.perf_counter() - started))


def consumer(url: str, names: Names, stream: str, expect: type, n: int, batch: int, ready: Any, go: Any, out: Any) -> None:
    """Read batches and ack each with its terminal outcome (the learner's settle), until n are done."""
    q = _queue(url, stream, names, "consumer", expect)
    q.ensure_group()
    ready.set()
    go.wait()
    done = 0
    while done < n:
        got = q.read(batch, block_ms=1000)
        if got:
            q.ack([d.entry_id for d in got], ledger={d.message.id: ledger.TRAINED for d in got})
            done += len(got)
    out.put(("consumer", time.perf_counter()))


def teacher(url: str, names: Names, scored: ScoredPrefix, n: int, batch: int, ready: Any, go: Any, out: Any) -> None:
    """Read rollouts and forward them as scored prefixes (precomputed scores: the queue is what is timed)."""
    inbox = _queue(url, names.rollouts, names, "teacher", RolloutPrefix)
    outbox = _queue(url, names.scored, names, "teacher", None)
    inbox.ensure_group()
    scores = {"teacher_logprobs_R": scored.teacher_logprobs_R, "topk_ids_RK": scored.topk_ids_RK,
              "topk_logprobs_RK": scored.topk_logprobs_RK, "teacher_id": "teacher-0", "cached_tokens": 0,
              "scored_tokens": len(scored.response_ids_R)}
    ready.set()
    go.wait()
    done = 0
    while done < n:
        got = inbox.read(batch, block_ms=1000)
        if got:
            results = [(d, ScoredPrefix.from_rollout(d.message, **scores)) for d in got]
            done += len(inbox.forward(results, outbox).done)
    out.put(("teacher", time.perf_counter()))


def run_roles(url: str, targets: list[tuple[Any, tuple[Any, ...]]], *, expect_done: str) -> float:
    """Start the role processes, release them together, and return seconds until `expect_done` reports."""
    ready = [CTX.Event() for _ in targets]
    go, out = CTX.Event(), CTX.Queue()
    procs = []
    for (fn, fargs), ev in zip(targets, ready, strict=True):
        extra = (go, out) if fn is producer else (ev, go, out)
        if fn is producer:
            ev.set()
        procs.append(CTX.Process(target=fn, args=(url, *fargs, *extra), daemon=True))
    for p in procs:
        p.start()
    for ev in ready:
        if not ev.wait(60):
            raise SystemExit("bench: a role did not get ready within 60s")
    started = time.perf_counter()
    go.set()
    results: dict[str, float] = {}
    try:
        while expect_done not in results:
            name, value = out.get(timeout=600)
            results[name] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if "producer" in results and expect_done == "producer":
        return results["producer"]
    return results[expect_done] - started


# ---------------------------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------------------------


def prefill(url: str, names: Names, message: RolloutPrefix, n: int) -> None:
    q = _queue(url, names.rollouts, names, "prefill", None)
    for _ in range(n):
        message.id = uuid.uuid4().hex
        q.publish(message, ledger_outcome=ledger.PRODUCED)


def verify(url: str, names: Names, n: int, streams: list[str]) -> None:
    """Refuse a row whose prefixes were not all settled: every one trained, every stream empty."""
    client = redis.Redis.from_url(url)
    counts = ledger.counts(client, names)
    depths = {s: int(client.xlen(s)) for s in streams}
    if counts.get(ledger.TRAINED, 0) != n or any(depths.values()):
        raise SystemExit(f"bench: {n} prefixes sent, ledger {counts}, stream depths {depths}")


def bench_payload(url: str, label: str, message: RolloutPrefix, n: int, args: argparse.Namespace, tmp: Path) -> list[Row]:
    """The three single-stream rows for one payload; its stream is `rollouts` whatever the message."""
    size = len(encode(message))
    ceiling = xadd_ceiling(url, size, max(4 * n, 64), tmp)
    expect = type(message)
    rows = []
    names = Names(f"bench-{label}")

    def fresh() -> None:
        redis.Redis.from_url(url).flushdb()

    fresh()
    secs = run_roles(url, [(producer, (names, message, n, 0))], expect_done="producer")
    rows.append(Row("publish only", label, n, secs, ceiling, size))
    fresh()
    secs = run_roles(url, [(producer, (names, message, n, args.batch))], expect_done="producer")
    rows.append(Row(f"publish_many (batch {args.batch})", label, n, secs, ceiling, size))
    fresh()
    prefill(url, names, message, n)
    secs = run_roles(url, [(consumer, (names, names.rollouts, expect, n, args.batch))], expect_done="consumer")
    verify(url, names, n, [names.rollouts])
    rows.append(Row("read + ack only", label, n, secs, ceiling, size))
    fresh()
    secs = run_roles(url, [(consumer, (names, names.rollouts, expect, n, args.batch)),
                           (producer, (names, message, n, args.batch))], expect_done="consumer")
    verify(url, names, n, [names.rollouts])
    rows.append(Row("publish -> read -> ack", label, n, secs, ceiling, size))
    print(f"[bench] {label} done", file=sys.stderr)
    return rows


def bench_hop(url: str, rollout: RolloutPrefix, scored: ScoredPrefix, n: int, ceilings: dict[str, float],
              args: argparse.Namespace) -> Row:
    redis.Redis.from_url(url).flushdb()
    names = Names("bench-hop")
    secs = run_roles(url, [(consumer, (names, names.scored, ScoredPrefix, n, args.batch)),
                           (teacher, (names, scored, n, args.batch)),
                           (producer, (names, rollout, n, args.batch))], expect_done="consumer")
    verify(url, names, n, [names.rollouts, names.scored])
    ceiling = 1.0 / (1.0 / ceilings["rollout"] + 1.0 / ceilings["scored"])
    return Row("teacher hop (publish -> forward -> ack)", "rollout+scored", n, secs, ceiling,
               len(encode(rollout)) + len(encode(scored)))


def print_report(rows: list[Row], args: argparse.Namespace, aof: bool) -> None:
    print(f"\nqueue benchmark: StreamQueue on redis-server ({'AOF everysec' if aof else 'no persistence'}), "
          f"prompt {args.prompt} + response {args.response} tokens, top-k {args.k} {args.topk_dtype}, "
          f"read/ack batch {args.batch}; {os.cpu_count()} CPUs")
    print("prefixes/s; ceiling = redis-benchmark XADD/s of the same payload size (-c 1 -P 16), same server, same run")
    head = ["path", "payload", "B/prefix", "prefixes", "prefixes/s", "MB/s", "XADD ceiling/s", "vs ceiling"]
    print_table(head, [[r.name, r.payload, fmt(r.payload_bytes, "B"), str(r.n), fmt(r.per_s),
                        fmt(r.per_s * r.payload_bytes / 1e6), fmt(r.ceiling_ps), ratio(r.per_s, r.ceiling_ps, 2)]
                       for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--response", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--vocab", type=int, default=152_064)
    p.add_argument("--topk-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--n-rollout", type=int, default=5000, help="rollout prefixes per row")
    p.add_argument("--n-scored", type=int, default=600, help="scored prefixes per row (and teacher-hop prefixes)")
    p.add_argument("--batch", type=int, default=16, help="read count / ack batch (teacher.batch_size)")
    p.add_argument("--no-aof", action="store_true", help="redis-server without persistence")
    p.add_argument("--redis-url", default=None, help="an existing Redis (its database is FLUSHed!)")
    p.add_argument("--quick", action="store_true", help="a few small messages (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt, args.response, args.n_rollout, args.n_scored = 8, 16, 40, 20
    rollout, scored = make_messages(args)
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp_s, \
            redis_server(args.redis_url, Path(tmp_s), aof=not args.no_aof) as url:
        tmp = Path(tmp_s)
        rows = bench_payload(url, "rollout", rollout, args.n_rollout, args, tmp)
        rows += bench_payload(url, "scored", scored, args.n_scored, args, tmp)
        ceilings = {"rollout": rows[0].ceiling_ps, "scored": rows[4].ceiling_ps}
        rows.append(bench_hop(url, rollout, scored, args.n_scored, ceilings, args))
        redis.Redis.from_url(url).flushdb()
    print_report(rows, args, aof=not args.no_aof and args.redis_url is None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
