"""Prometheus metrics: every name in one place, because dashboards and alerts depend on them.

Each role builds its metrics on its own `CollectorRegistry` (no global state, testable on a free
port) and serves `/metrics` and `/health` from a background thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protocol.files import WRITE_ERROR_REASONS
from protocol.reconnect import OutageCollector

HORIZON_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

# Label values known before anything happens are exported at 0 from the start: a labelled series
# that does not exist yet makes a dashboard query return nothing ("No data"), which looks the same
# as a broken query, and `rate()` needs the 0 sample to count the first increment.
# learner/staleness.py owns the drop reasons (protocol must not import a role); the dashboard test
# (tests/integration/test_dashboard.py) pins that the two lists agree.
LEARNER_DROP_REASONS = ("stale", "future_version", "invalid_version")
ACTOR_COMPUTE_STAGE = "actor_truncation"
TEACHER_COMPUTE_STAGE = "teacher_cache"
# What the FLOPs-saved counter counts, honestly: forward compute that was not spent. The HF teacher
# scorer re-reads the whole context of a partially cached sequence, so only fully cached sequences
# save teacher compute (an SGLang server's radix cache may reuse a shared context's KV on its own;
# that saving is the server's and is not counted here).
COMPUTE_SAVED_HELP = (
    "Estimated forward FLOPs not spent (2 x parameters x tokens). actor_truncation: tokens past the horizon "
    "never generated, counted as the budget bound (max_new_tokens - horizon: at most what was saved, see "
    "opd_actor_tokens_saved_estimate); teacher_cache: tokens of fully cached sequences the teacher never ran "
    "(a partial hit still runs the teacher over the whole sequence, so it counts nothing here)"
)


@dataclass
class CommonMetrics:
    queue_depth: Gauge
    dead_letters: Counter


def common_metrics(registry: CollectorRegistry) -> CommonMetrics:
    registry.register(OutageCollector())  # opd_redis_outages_total, opd_redis_outage_seconds_total
    return CommonMetrics(
        queue_depth=Gauge("opd_queue_depth", "Backlog (undelivered + pending) per stream", ["stream"], registry=registry),
        dead_letters=Counter("opd_dead_letters", "Messages moved to the dead-letter stream", ["stream", "reason"], registry=registry),
    )


@dataclass
class ActorMetrics(CommonMetrics):
    prefixes: Counter
    tokens_generated: Counter
    tokens_saved_bound: Counter
    probes: Counter
    tokens_saved_estimate: Gauge
    tokens_saved_stderr: Gauge
    horizon: Histogram
    policy_version: Gauge
    compute_saved: Counter
    admission_wait: Counter
    weight_reloads: Counter
    prompts_skipped: Counter


def actor_metrics(registry: CollectorRegistry) -> ActorMetrics:
    c = common_metrics(registry)
    m = ActorMetrics(
        queue_depth=c.queue_depth,
        dead_letters=c.dead_letters,
        prefixes=Counter("opd_actor_prefixes", "Prefixes produced", registry=registry),
        tokens_generated=Counter("opd_actor_tokens_generated", "Student tokens sampled", registry=registry),
        tokens_saved_bound=Counter(
            "opd_actor_tokens_saved_bound",
            "Upper bound on student tokens truncation saved: max_new_tokens - horizon for every prefix stopped at its "
            "horizon, as if every full rollout ran to the budget (see opd_actor_tokens_saved_estimate)",
            registry=registry,
        ),
        probes=Counter("opd_actor_probes", "Rollouts sampled to full length as probes (actor.probe_fraction): "
                       "measured, never trained on", registry=registry),
        tokens_saved_estimate=Gauge(
            "opd_actor_tokens_saved_estimate",
            "Student tokens truncation saved since this actor started, estimated from its probes' lengths "
            "(protocol/savings.py; 0 before its first probe)", registry=registry),
        tokens_saved_stderr=Gauge(
            "opd_actor_tokens_saved_estimate_stderr",
            "Standard error of opd_actor_tokens_saved_estimate (+Inf before two probes); across actors, "
            "sqrt(sum(stderr^2))", registry=registry),
        horizon=Histogram("opd_actor_horizon_tokens", "Truncation horizon per prefix", buckets=HORIZON_BUCKETS, registry=registry),
        policy_version=Gauge("opd_actor_policy_version", "Policy version the actor samples with", registry=registry),
        compute_saved=Counter("opd_compute_saved_flops", COMPUTE_SAVED_HELP, ["stage"], registry=registry),
        admission_wait=Counter("opd_actor_admission_wait_seconds", "Seconds waiting for admission or back-pressure", registry=registry),
        weight_reloads=Counter("opd_actor_weight_reloads", "Weight reloads", registry=registry),
        prompts_skipped=Counter("opd_actor_prompts_skipped", "Prompts left out at start, by why (too_long: no room "
                                "for actor.max_new_tokens in the student's context)", ["reason"], registry=registry),
    )
    m.compute_saved.labels(stage=ACTOR_COMPUTE_STAGE)
    m.prompts_skipped.labels(reason="too_long")
    m.tokens_saved_stderr.set(float("inf"))
    return m


@dataclass
class TeacherMetrics(CommonMetrics):
    tokens_scored: Counter
    tokens_cached: Counter
    cache_hit_tokens: Counter
    cache_miss_tokens: Counter
    cache_bytes_written: Counter
    cache_errors: Counter
    cache_write_errors: Counter
    compute_saved: Counter
    prefixes: Counter
    forwards_refused: Counter


def teacher_metrics(registry: CollectorRegistry) -> TeacherMetrics:
    c = common_metrics(registry)
    m = TeacherMetrics(
        queue_depth=c.queue_depth,
        dead_letters=c.dead_letters,
        tokens_scored=Counter("opd_teacher_tokens_scored", "Response tokens the teacher computed", registry=registry),
        tokens_cached=Counter("opd_teacher_tokens_cached", "Response tokens whose teacher scores came from the cache "
                              "(not compute saved: on a partial hit the teacher still runs over the whole sequence; "
                              "see opd_compute_saved_flops_total{stage=\"teacher_cache\"})", registry=registry),
        cache_hit_tokens=Counter("opd_cache_hit_tokens", "Sequence tokens found in the cache", registry=registry),
        cache_miss_tokens=Counter("opd_cache_miss_tokens", "Sequence tokens not found in the cache", registry=registry),
        cache_bytes_written=Counter("opd_cache_bytes_written", "Bytes written to the cache", registry=registry),
        cache_errors=Counter("opd_cache_errors", "Cache lookups or puts that failed (the work went on uncached)",
                             ["op"], registry=registry),
        cache_write_errors=Counter("opd_cache_write_errors", "Cache puts not stored, by why: disk_full (ENOSPC/EDQUOT: "
                                   "caching resumes by itself once space is back), io_error, other", ["reason"],
                                   registry=registry),
        compute_saved=Counter("opd_compute_saved_flops", COMPUTE_SAVED_HELP, ["stage"], registry=registry),
        prefixes=Counter("opd_teacher_prefixes", "Prefixes scored and forwarded", registry=registry),
        forwards_refused=Counter(
            "opd_teacher_forwards_refused",
            "Scored prefixes not forwarded: another teacher had reclaimed them (claim_idle_ms) and forwards them itself",
            registry=registry),
    )
    m.compute_saved.labels(stage=TEACHER_COMPUTE_STAGE)
    for reason in WRITE_ERROR_REASONS:
        m.cache_write_errors.labels(reason=reason)
    return m


@dataclass
class LearnerMetrics(CommonMetrics):
    steps: Counter
    loss: Gauge
    reverse_kl: Gauge
    support_kl: Gauge
    tokens_per_second: Gauge
    tokens_trained: Counter
    policy_version: Gauge
    staleness: Histogram
    dropped: Counter
    idle_fraction: Gauge
    ratio_mean: Gauge
    ratio_max: Gauge
    clip_fraction: Gauge
    padding_fraction: Gauge
    publish_seconds: Gauge
    publish_bytes: Counter
    eval_reverse_kl: Gauge
    ledger_rolled_up: Counter
    ledger_fields: Gauge
    heldout_accuracy: Gauge
    duplicates: Counter
    probes: Counter
    write_failures: Counter


def learner_metrics(registry: CollectorRegistry) -> LearnerMetrics:
    c = common_metrics(registry)
    m = LearnerMetrics(
        queue_depth=c.queue_depth,
        dead_letters=c.dead_letters,
        steps=Counter("opd_learner_steps", "Optimizer steps", registry=registry),
        loss=Gauge("opd_learner_loss", "Loss of the last step", registry=registry),
        reverse_kl=Gauge("opd_learner_reverse_kl", "Reverse KL on the last batch's training prefixes: the sampled-token "
                         "estimate, mean of log mu(y) - log p_T(y) over the student's tokens", registry=registry),
        support_kl=Gauge("opd_learner_support_kl", "The loss's restricted-support KL of the last batch (teacher top-k + "
                         "one tail bucket): a lower bound of the reverse KL, far below it on a large vocabulary",
                         registry=registry),
        tokens_per_second=Gauge("opd_learner_tokens_per_second", "Trained tokens per second (last step)", registry=registry),
        tokens_trained=Counter("opd_learner_tokens_trained", "Response tokens trained on", registry=registry),
        policy_version=Gauge("opd_learner_policy_version", "Current policy version", registry=registry),
        staleness=Histogram("opd_learner_staleness", "Policy-version lag of consumed samples", buckets=STALENESS_BUCKETS, registry=registry),
        dropped=Counter("opd_learner_dropped", "Samples dropped before training", ["reason"], registry=registry),
        idle_fraction=Gauge("opd_learner_idle_fraction", "Fraction of wall time waiting for data", registry=registry),
        ratio_mean=Gauge("opd_learner_is_ratio_mean", "Mean importance ratio pi_theta/pi_behaviour", registry=registry),
        ratio_max=Gauge("opd_learner_is_ratio_max", "Max importance ratio", registry=registry),
        clip_fraction=Gauge("opd_learner_is_clip_fraction", "Fraction of tokens whose ratio was truncated", registry=registry),
        padding_fraction=Gauge("opd_learner_padding_fraction", "Fraction of micro-batch slots that were padding", registry=registry),
        publish_seconds=Gauge("opd_learner_publish_seconds", "Seconds to publish the last weights", registry=registry),
        publish_bytes=Counter("opd_learner_publish_bytes", "Bytes of weights published", registry=registry),
        eval_reverse_kl=Gauge("opd_learner_eval_reverse_kl", "Full-distribution reverse KL on held-out prompts", registry=registry),
        ledger_rolled_up=Counter("opd_learner_ledger_rolled_up", "Settled ledger fields folded into per-state counters "
                                 "(protocol/ledger.py rollup)", registry=registry),
        ledger_fields=Gauge("opd_learner_ledger_fields", "Fields left in the ledger hash after the last rollup "
                            "(in flight + recently settled)", registry=registry),
        heldout_accuracy=Gauge("opd_learner_heldout_accuracy", "Greedy exact match on held-out prompts with reference "
                               "answers (learner.eval.accuracy_prompts; unset when off)", registry=registry),
        duplicates=Counter("opd_learner_duplicates",
                           "Scored prefixes refused untrained: a copy of an id already trained or in flight", registry=registry),
        probes=Counter("opd_learner_probes", "Full-length probe rollouts measured (KL by position) and never trained on; "
                       "the ledger counts them as dropped", registry=registry),
        write_failures=Counter("opd_learner_write_failures", "Checkpoints or published weights not written, by what "
                               "(checkpoint, weights) and why (disk_full, io_error): the previous one stays intact",
                               ["what", "reason"], registry=registry),
    )
    for reason in LEARNER_DROP_REASONS:
        m.dropped.labels(reason=reason)
    for what in ("checkpoint", "weights"):
        for reason in WRITE_ERROR_REASONS[:2]:
            m.write_failures.labels(what=what, reason=reason)
    return m


class MetricsServer:
    """`/metrics` and `/health` for one registry, on a daemon thread. Port 0 picks a free port."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = registry
        registry_ref = registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path.rstrip("/")  # `/metrics?x=1` and `/metrics/` yes, `/metricsfoo` no
                if path == "/metrics":
                    body, ctype, code = generate_latest(registry_ref), CONTENT_TYPE_LATEST, 200
                elif path == "/health":
                    body, ctype, code = b"ok\n", "text/plain", 200
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        # a short poll interval: `close()` (shutdown) waits for one poll, 0.5 s by default
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="metrics", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
