"""The teacher loop: score student prefixes, reuse what the cache already holds, forward to the learner.

Scores are computed on the exact token ids the student sampled (never re-tokenized text). For each
prefix the cache returns the longest cached run of blocks; the teacher scores only the positions
after it, stores the new blocks, and forwards the response's scores. Forwarding and acknowledging
happen in one Redis transaction.

What the cache saves, honestly: a fully cached sequence costs no teacher forward at all. A partial
hit saves no forward compute with the HF scorer: the model still runs over the whole sequence (the
cached context is needed to score what follows it); only the scores of the cached positions are
reused. (An SGLang teacher server's radix cache may reuse the shared context's KV by itself; that
saving is the server's and is not counted here.) So `opd_compute_saved_flops_total{stage=
"teacher_cache"}` counts the tokens of a batch the scorer did not forward (`tokens_forwarded`), i.e.
full hits, while `cached_tokens` / `opd_teacher_tokens_cached_total` count response tokens whose
scores came from the cache, partial hits included.

Why cache failures never fail the work, and why the cache is looked up and written once per batch:
`cache/scoring.py`, which holds `score_with_cache`, the one implementation of "look up, score the
rest, store" that the teacher loop and offline warming (`opd cache warm`, `cache/warm.py`) share.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry

from cache.config import TeacherConfig
from cache.scorers.base import TeacherScorer
from cache.scoring import FullScores, score_with_cache
from protocol import ledger
from protocol.compute import forward_flops
from protocol.config import TransportConfig
from protocol.errors import InputError
from protocol.messages import RolloutPrefix, ScoredPrefix
from protocol.names import Names
from protocol.runtime import StopFlag, held_entries, register_endpoint
from protocol.streams import Delivery, StreamQueue, connect_role
from protocol.telemetry import MetricsServer, TeacherMetrics, teacher_metrics

if TYPE_CHECKING:
    import redis

    from cache.store import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class TeacherSummary:
    prefixes: int = 0
    tokens_scored: int = 0
    tokens_cached: int = 0
    dead: int = 0
    cache_errors: int = 0


def make_scorer(cfg: TeacherConfig) -> TeacherScorer:
    """The scorer `teacher.engine` names, on the teacher's model, revision and temperature (the teacher
    loop and `opd cache warm` build it the same way, so both store under the same identity)."""
    return cfg.engine.build(cfg.model_dir, revision=cfg.revision, temperature=cfg.temperature)


def topk_storage_dtype(cfg: TeacherConfig) -> np.dtype:
    """The numpy dtype of stored and forwarded top-k logprobs (teacher.topk_dtype)."""
    return np.dtype(np.float16 if cfg.topk_dtype == "float16" else np.float32)


def open_cache(cfg: TeacherConfig, identity: str, client: redis.Redis, names: Names, writer_id: str) -> TeacherCache:
    """The teacher's cache, as every writer must open it.

    Why one function: the namespace (identity + k + top-k dtype), the Redis prefix and the block
    size decide which entries a reader can see; a warmer that opened the cache any other way would
    write entries no teacher ever hits.
    """
    from cache.keys import cache_namespace
    from cache.store import TeacherCache

    dtype = topk_storage_dtype(cfg)
    return TeacherCache(cfg.cache_dir, client, k=cfg.topk, namespace=cache_namespace(identity, cfg.topk, dtype),
                        topk_dtype=dtype, block_size=cfg.block_size, writer_id=writer_id,
                        redis_prefix=names.key("cache"))


class Teacher:
    def __init__(self, cfg: TeacherConfig, transport: TransportConfig, *, worker_id: str,
                 stop: StopFlag | None = None, registry: CollectorRegistry | None = None) -> None:
        if not transport.redis_url:
            raise ValueError("transport.redis_url is required to run a teacher")
        self.cfg = cfg
        self.worker_id = worker_id
        self.stop = stop or StopFlag()
        self.names = Names(transport.namespace)
        self.client = connect_role(transport)
        self.stats = ledger.StatsWriter(self.client, self.names, worker_id)  # run stats, each batch's added once
        self.registry = registry or CollectorRegistry()
        self.metrics: TeacherMetrics = teacher_metrics(self.registry)
        self.inbox = StreamQueue(
            self.client, self.names.rollouts, names=self.names, consumer=worker_id, expect=RolloutPrefix,
            max_deliveries=transport.max_deliveries, claim_idle_ms=transport.claim_idle_ms,
            max_bytes=transport.max_message_bytes,
            on_dead_letter=lambda d: self.metrics.dead_letters.labels(stream=d.stream, reason=d.reason.split(":")[0]).inc(),
        )
        self.outbox: StreamQueue[ScoredPrefix] = StreamQueue(self.client, self.names.scored, names=self.names, high_water=transport.high_water,
                                  max_bytes=transport.max_message_bytes)
        self.backpressure_timeout_s = transport.backpressure_timeout_s
        self.scorer = make_scorer(cfg)
        self.inbox.vocab_size = vocab = getattr(self.scorer, "vocab_size", None)  # ids past it: dead-lettered
        if vocab is not None and cfg.topk > vocab:
            raise InputError(f"teacher.topk={cfg.topk} exceeds the vocabulary of teacher.model_dir ({vocab} ids)")
        self.params = self.scorer.num_parameters()
        self.topk_dtype = topk_storage_dtype(cfg)
        self.cache = open_cache(cfg, self.scorer.identity, self.client, self.names, worker_id) if cfg.cache_enabled else None
        self.summary = TeacherSummary()
        self.flops_saved = 0
        self.tokens_forwarded = 0  # since the last run-stats update: the teacher's FLOPs (protocol/compute.py)
        self.next_evict = 0.0
        self.batch_cache_errors = 0

    def close(self) -> None:
        """Release the cache's writer lock (a restart with the same worker id resumes its shard)."""
        if self.cache is not None:
            self.cache.close()

    # -- scoring ---------------------------------------------------------------------------------
    def score_full(self, seqs: list[np.ndarray]) -> list[FullScores]:
        """Scores for every position of each sequence, from the cache where it has them."""
        full, stats = score_with_cache(self.scorer, self.cache, seqs, k=self.cfg.topk, topk_dtype=self.topk_dtype)
        self.metrics.cache_bytes_written.inc(stats.bytes_written)
        if stats.lookup_errors:
            self.metrics.cache_errors.labels(op="lookup").inc(stats.lookup_errors)
        if stats.put_errors:
            self.metrics.cache_errors.labels(op="put").inc(stats.put_errors)
        for reason, n in stats.put_error_reasons.items():
            self.metrics.cache_write_errors.labels(reason=reason).inc(n)
        self.summary.cache_errors += stats.errors
        self.batch_cache_errors += stats.errors
        return full

    def process(self, deliveries: list[Delivery[RolloutPrefix]]) -> list[tuple[Delivery[RolloutPrefix], ScoredPrefix]]:
        msgs = [d.message for d in deliveries]
        seqs = [np.concatenate([m.prompt_ids_P, m.response_ids_R]).astype(np.int32) for m in msgs]
        forwarded_before = self.scorer.tokens_forwarded
        full = self.score_full(seqs)
        # Saved = tokens a cache-less teacher would have run forward minus what this one did (the
        # scorer re-reads the context of a partial hit, so only fully cached sequences save compute).
        forwarded = self.scorer.tokens_forwarded - forwarded_before
        avoided = max(0, sum(len(s) for s in seqs) - forwarded)
        flops_saved = 2 * self.params * avoided
        done: list[tuple[Delivery[RolloutPrefix], ScoredPrefix]] = []
        counts: list[tuple[int, int]] = []  # (cached, scored) response tokens per message
        for d, m, f in zip(deliveries, msgs, full, strict=True):
            result = ScoredPrefix.from_sequence_scores(m, f.logprobs_T, f.topk_ids_TK, f.topk_logprobs_TK,
                                                       teacher_id=self.scorer.identity, cached_upto=f.cached_upto)
            cached, scored = result.cached_tokens, result.scored_tokens
            # Checked here, inside step()'s try, so bad scores dead-letter their own message (the
            # cache put used to catch them; it no longer raises).
            result.validate()
            if np.isnan(result.topk_logprobs_RK).any():
                raise ValueError("teacher top-k logprobs contain NaN")
            done.append((d, result))
            counts.append((cached, scored))
        # Counted only once the whole batch is good: a failed batch is redone one by one.
        self.metrics.compute_saved.labels(stage="teacher_cache").inc(flops_saved)
        self.flops_saved += flops_saved
        self.tokens_forwarded += forwarded
        for seq, f, (cached, scored) in zip(seqs, full, counts, strict=True):
            self.metrics.cache_hit_tokens.inc(f.cached_upto)
            self.metrics.cache_miss_tokens.inc(len(seq) - f.cached_upto)
            self.metrics.tokens_cached.inc(cached)
            self.metrics.tokens_scored.inc(scored)
            self.summary.tokens_cached += cached
            self.summary.tokens_scored += scored
        return done

    def maybe_evict(self) -> None:
        """Keep the cache within teacher.cache_budget_bytes, from whichever teacher holds the lock.

        One evictor at a time (a Redis lock with a TTL, so a teacher that dies holding it does not block
        eviction for long); `ops.evict` never removes a shard a live writer is appending to.
        """
        if self.cache is None or self.cfg.cache_budget_bytes is None or time.monotonic() < self.next_evict:
            return
        self.next_evict = time.monotonic() + self.cfg.cache_evict_interval_s
        lock = self.names.key("cache:evict-lock")
        if not self.client.set(lock, self.worker_id, nx=True, ex=max(60, int(self.cfg.cache_evict_interval_s))):
            return
        try:
            from cache import ops

            report = ops.evict(self.cfg.cache_dir, self.client, self.cfg.cache_budget_bytes,
                               redis_prefix=self.names.key("cache"))
            if report.removed:
                log.info("%s: evicted %d shards (%d -> %d bytes, budget %d)", self.worker_id, len(report.removed),
                         report.bytes_before, report.bytes_after, report.budget_bytes)
        except Exception as exc:  # eviction is housekeeping: never stop scoring for it
            log.warning("%s: cache eviction failed: %s", self.worker_id, exc)
        finally:
            self.client.delete(lock)

    def step(self) -> int:
        self.maybe_evict()
        self.outbox.wait_for_room(timeout_s=self.backpressure_timeout_s, should_stop=self.stop.is_set)
        if self.stop.is_set():
            return 0  # stopping: take no new work (what was read is forwarded before this point)
        deliveries = self.inbox.read(self.cfg.batch_size, block_ms=500)
        if not deliveries:
            return 0
        try:
            done = self.process(deliveries)
        except Exception as exc:  # one bad prefix must not sink the batch: retry one by one
            log.warning("batch of %d failed (%s): scoring one by one", len(deliveries), exc)
            done = []
            for d in deliveries:
                try:
                    done += self.process([d])
                except Exception as one_exc:
                    self.inbox.dead_letter(d, f"scoring failed: {type(one_exc).__name__}: {one_exc}")
                    self.metrics.dead_letters.labels(stream=self.inbox.stream, reason="scoring failed").inc()
                    self.summary.dead += 1
        settled = self.inbox.forward(done, self.outbox)
        if settled.refused:  # reclaimed by another teacher while this one was slow: it forwards them, not us
            self.metrics.forwards_refused.inc(len(settled.refused))
            refused = set(settled.refused)
            done = [(d, r) for d, r in done if d.entry_id not in refused]
        scored = sum(r.scored_tokens for _d, r in done)
        cached = sum(r.cached_tokens for _d, r in done)
        self.stats.add(teacher_prefixes=len(done), teacher_tokens_scored=scored,
                       teacher_tokens_cached=cached, flops_saved_cache=self.flops_saved,
                       teacher_cache_errors=self.batch_cache_errors, teacher_tokens_forwarded=self.tokens_forwarded,
                       flops_teacher=forward_flops(self.params, self.tokens_forwarded))
        self.flops_saved = 0
        self.tokens_forwarded = 0
        self.batch_cache_errors = 0
        self.summary.prefixes += len(done)
        self.metrics.prefixes.inc(len(done))
        self.metrics.queue_depth.labels(stream=self.names.rollouts).set(self.inbox.depth())
        self.metrics.queue_depth.labels(stream=self.names.scored).set(self.outbox.depth())
        return len(done)

    def run(self) -> TeacherSummary:
        log.info("%s: scorer %s (%d params), k=%d, cache=%s", self.worker_id, self.scorer.identity[:16], self.params,
                 self.cfg.topk, self.cfg.cache_dir if self.cache is not None else "off")
        t0 = time.perf_counter()
        while not self.stop.is_set():
            self.step()
        dt = time.perf_counter() - t0
        log.info("%s: stopped: %d prefixes, %d tokens scored (%.0f tok/s), %d served from cache, %d cache errors",
                 self.worker_id, self.summary.prefixes, self.summary.tokens_scored,
                 self.summary.tokens_scored / max(dt, 1e-9), self.summary.tokens_cached, self.summary.cache_errors)
        return self.summary


def run_teacher(cfg: TeacherConfig, transport: TransportConfig, *, worker_id: str,
                stop: StopFlag | None = None) -> TeacherSummary:
    """Entry point of `opd teacher`."""
    teacher = Teacher(cfg, transport, worker_id=worker_id, stop=stop)
    server = MetricsServer(teacher.registry, host=cfg.metrics_host, port=cfg.metrics_port)
    register_endpoint(teacher.client, teacher.names, worker_id, server.url)
    teacher.stop.on_abandon(lambda: held_entries(teacher.inbox))
    log.info("%s: metrics at %s", worker_id, server.url)
    try:
        return teacher.run()
    finally:
        server.close()
        teacher.close()
