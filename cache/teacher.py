"""The teacher loop: score student prefixes, reuse what the cache already holds, forward to the learner.

Scores are computed on the exact token ids the student sampled (never re-tokenized text). For each
prefix the cache returns the longest cached run of blocks; the teacher computes only the positions
after it (it still reads the whole context), stores the new blocks, and forwards the response's
scores. Forwarding and acknowledging happen in one Redis transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry

from cache.config import TeacherConfig
from cache.scorer import Scores, TeacherScorer
from protocol import ledger
from protocol.config import TransportConfig
from protocol.messages import Message, RolloutPrefix, ScoredPrefix
from protocol.names import Names
from protocol.runtime import StopFlag, register_endpoint, resolve_device
from protocol.streams import Delivery, StreamQueue, connect
from protocol.telemetry import MetricsServer, TeacherMetrics, teacher_metrics

log = logging.getLogger(__name__)


@dataclass
class TeacherSummary:
    prefixes: int = 0
    tokens_scored: int = 0
    tokens_cached: int = 0
    dead: int = 0


def make_scorer(cfg: TeacherConfig) -> TeacherScorer:
    if cfg.engine == "sglang":
        from cache.sglang_scorer import SGLangTeacherScorer

        if not cfg.sglang_url:
            raise ValueError("teacher.sglang_url is required when teacher.engine is 'sglang'")
        return SGLangTeacherScorer(cfg.sglang_url, temperature=cfg.temperature, revision=cfg.revision,
                                   model_dir=cfg.model_dir or None)
    from cache.scorer import HFTeacherScorer

    return HFTeacherScorer(cfg.model_dir, device=resolve_device(cfg.device), temperature=cfg.temperature,
                           revision=cfg.revision)


@dataclass
class FullScores:
    """Teacher values for every position 0..T-1 of one sequence (position 0 has none: NaN)."""

    logprobs_T: np.ndarray
    topk_ids_TK: np.ndarray
    topk_logprobs_TK: np.ndarray
    cached_upto: int


class Teacher:
    def __init__(self, cfg: TeacherConfig, transport: TransportConfig, *, worker_id: str,
                 stop: StopFlag | None = None, registry: CollectorRegistry | None = None) -> None:
        if not transport.redis_url:
            raise ValueError("transport.redis_url is required to run a teacher")
        self.cfg = cfg
        self.worker_id = worker_id
        self.stop = stop or StopFlag()
        self.names = Names(transport.namespace)
        self.client = connect(transport.redis_url)
        self.registry = registry or CollectorRegistry()
        self.metrics: TeacherMetrics = teacher_metrics(self.registry)
        self.inbox = StreamQueue(
            self.client, self.names.rollouts, names=self.names, consumer=worker_id, expect=RolloutPrefix,
            max_deliveries=transport.max_deliveries, claim_idle_ms=transport.claim_idle_ms,
            max_bytes=transport.max_message_bytes,
            on_dead_letter=lambda d: self.metrics.dead_letters.labels(stream=d.stream, reason=d.reason.split(":")[0]).inc(),
        )
        self.outbox = StreamQueue(self.client, self.names.scored, names=self.names, high_water=transport.high_water,
                                  max_bytes=transport.max_message_bytes)
        self.backpressure_timeout_s = transport.backpressure_timeout_s
        self.scorer = make_scorer(cfg)
        self.params = self.scorer.num_parameters()
        self.topk_dtype = np.dtype(np.float16 if cfg.topk_dtype == "float16" else np.float32)
        self.cache = self._open_cache() if cfg.cache_enabled else None
        self.summary = TeacherSummary()
        self.flops_saved = 0

    def _open_cache(self):  # type: ignore[no-untyped-def]
        from cache.keys import cache_namespace
        from cache.store import TeacherCache

        namespace = cache_namespace(self.scorer.identity, self.cfg.topk, self.topk_dtype)
        return TeacherCache(self.cfg.cache_dir, self.client, k=self.cfg.topk, namespace=namespace,
                            topk_dtype=self.topk_dtype, block_size=self.cfg.block_size, writer_id=self.worker_id,
                            redis_prefix=self.names.key("cache"))

    # -- scoring ---------------------------------------------------------------------------------
    def score_full(self, seqs: list[np.ndarray]) -> list[FullScores]:
        """Scores for every position of each sequence, from the cache where it has them."""
        k = self.cfg.topk
        hits = [self.cache.lookup(s) if self.cache is not None else None for s in seqs]
        starts = [max(1, h.prefix_len) if h is not None else 1 for h in hits]
        todo = [i for i, s in enumerate(seqs) if starts[i] < len(s)]
        computed: dict[int, Scores] = {}
        if todo:
            out = self.scorer.score([seqs[i] for i in todo], [starts[i] for i in todo], k)
            computed = dict(zip(todo, out, strict=True))
        full: list[FullScores] = []
        for i, seq in enumerate(seqs):
            T = len(seq)
            lp = np.full(T, np.nan, dtype=np.float32)
            ids = np.zeros((T, k), dtype=np.int32)
            tlp = np.zeros((T, k), dtype=self.topk_dtype)
            h, start = hits[i], starts[i]
            if h is not None and h.prefix_len > 0:
                n = h.prefix_len
                lp[:n], ids[:n], tlp[:n] = h.logprobs_N, h.topk_ids_NK, h.topk_logprobs_NK
            if i in computed:
                c = computed[i]
                lp[start:], ids[start:], tlp[start:] = c.logprobs_R, c.topk_ids_RK, c.topk_logprobs_RK
                if self.cache is not None:
                    put = self.cache.put(seq, lp, ids, tlp, from_pos=h.prefix_len if h is not None else 0)
                    self.metrics.cache_bytes_written.inc(put.bytes_written)
            cached_upto = min(h.prefix_len, T) if h is not None else 0
            full.append(FullScores(lp, ids, tlp, cached_upto))
        return full

    def process(self, deliveries: list[Delivery]) -> list[tuple[Delivery, Message]]:
        msgs: list[RolloutPrefix] = [d.message for d in deliveries]  # type: ignore[misc]
        seqs = [np.concatenate([m.prompt_ids_P, m.response_ids_R]).astype(np.int32) for m in msgs]
        forwarded_before = self.scorer.tokens_forwarded
        full = self.score_full(seqs)
        # Saved = tokens a cache-less teacher would have run forward minus what this one did (the
        # scorer re-reads the context of a partial hit, so only fully cached sequences save compute).
        avoided = max(0, sum(len(s) for s in seqs) - (self.scorer.tokens_forwarded - forwarded_before))
        flops_saved = 2 * self.params * avoided
        self.metrics.compute_saved.labels(stage="teacher_cache").inc(flops_saved)
        self.flops_saved += flops_saved
        done: list[tuple[Delivery, Message]] = []
        for d, m, seq, f in zip(deliveries, msgs, seqs, full, strict=True):
            P, T = len(m.prompt_ids_P), len(seq)
            R = T - P
            cached = max(0, f.cached_upto - P)
            scored = R - cached
            done.append((d, ScoredPrefix.from_rollout(
                m, teacher_logprobs_R=f.logprobs_T[P:].copy(), topk_ids_RK=f.topk_ids_TK[P:].copy(),
                topk_logprobs_RK=f.topk_logprobs_TK[P:].copy(), teacher_id=self.scorer.identity,
                cached_tokens=cached, scored_tokens=scored,
            )))
            self.metrics.cache_hit_tokens.inc(f.cached_upto)
            self.metrics.cache_miss_tokens.inc(T - f.cached_upto)
            self.metrics.tokens_cached.inc(cached)
            self.metrics.tokens_scored.inc(scored)
            self.summary.tokens_cached += cached
            self.summary.tokens_scored += scored
        return done

    def step(self) -> int:
        self.outbox.wait_for_room(timeout_s=self.backpressure_timeout_s, should_stop=self.stop.is_set)
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
        self.inbox.forward(done, self.outbox)
        scored = sum(r.scored_tokens for _d, r in done)  # type: ignore[attr-defined]
        cached = sum(r.cached_tokens for _d, r in done)  # type: ignore[attr-defined]
        ledger.add_stats(self.client, self.names, teacher_prefixes=len(done), teacher_tokens_scored=scored,
                         teacher_tokens_cached=cached, flops_saved_cache=self.flops_saved)
        self.flops_saved = 0
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
        log.info("%s: stopped: %d prefixes, %d tokens scored (%.0f tok/s), %d served from cache", self.worker_id,
                 self.summary.prefixes, self.summary.tokens_scored, self.summary.tokens_scored / max(dt, 1e-9),
                 self.summary.tokens_cached)
        return self.summary


def run_teacher(cfg: TeacherConfig, transport: TransportConfig, *, worker_id: str,
                stop: StopFlag | None = None) -> TeacherSummary:
    """Entry point of `opd teacher`."""
    teacher = Teacher(cfg, transport, worker_id=worker_id, stop=stop)
    server = MetricsServer(teacher.registry, host=cfg.metrics_host, port=cfg.metrics_port)
    register_endpoint(teacher.client, teacher.names, worker_id, server.url)
    log.info("%s: metrics at %s", worker_id, server.url)
    try:
        return teacher.run()
    finally:
        server.close()
