"""The actor loop: sample truncated student prefixes and stream them to the teachers.

Why the horizon is decided here and not afterwards: generation stops at the horizon, which is where
truncated rollouts save compute. Every prefix carries the policy version that produced it, so the
learner can bound staleness, and its behaviour logprobs, so the learner can correct for the lag.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from actors.admission import Admission, Heartbeat
from actors.config import ActorConfig
from actors.engines.base import Generation, RolloutEngine
from actors.schedules import Schedule
from protocol import ledger
from protocol.compute import forward_flops
from protocol.config import TransportConfig
from protocol.messages import RolloutPrefix
from protocol.names import Names
from protocol.runtime import StopFlag, control_flag, latest_weights, register_endpoint
from protocol.savings import ProbeTally, estimate_savings, probe_saving, saving_bound
from protocol.state import LearnerState
from protocol.streams import StreamQueue, connect_role
from protocol.telemetry import ActorMetrics, MetricsServer, actor_metrics

log = logging.getLogger(__name__)


@dataclass
class ActorSummary:
    prefixes: int = 0
    tokens_generated: int = 0
    tokens_saved: int = 0  # the budget bound (protocol/savings.py): max_new_tokens - horizon per prefix cut short
    reloads: int = 0
    probe_tally: ProbeTally = field(default_factory=ProbeTally)
    truncated: int = 0  # non-probe rollouts the schedule gave less than the budget: what the estimate is over

    def saved_estimate(self) -> str:
        """The probe estimate of tokens saved, for a log line."""
        est = estimate_savings(self.probe_tally, self.truncated)
        if est is None:
            return "unknown (no probes yet)"
        return f"{est.tokens:.0f}" + (f" +- {est.stderr:.0f}" if est.stderr is not None else "")


def truncated_view(response_ids: list[int], logprobs: list[float], finished: bool,
                   horizon: int) -> tuple[list[int], list[float], bool]:
    """A full-length rollout's first `horizon` tokens, as the truncated rollout they are (finished only when it
    ended at EOS within them)."""
    return list(response_ids[:horizon]), list(logprobs[:horizon]), finished and len(response_ids) <= horizon


@dataclass
class Batch:
    """One generated batch, before it is published: prompts, the schedule's horizons, what was sampled.

    `views`: (response ids, logprobs, finished) per rollout as sent (under actor.probe_truth, the first `horizon`
    tokens of a rollout run to the budget); `versions`: the policy version each was sampled with.
    """

    indices: list[int]
    drawn: list[int]
    probes: list[bool]
    horizons: list[int]
    gens: list[Generation]
    views: list[tuple[list[int], list[float], bool]]
    versions: list[int]


class Actor:
    def __init__(
        self, cfg: ActorConfig, transport: TransportConfig, *, actor_id: str, index: int = 0,
        stop: StopFlag | None = None, registry: CollectorRegistry | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        from actors.prompts import context_length, load_prompts, prompts_that_fit

        if not transport.redis_url:
            raise ValueError("transport.redis_url is required to run an actor")
        self.cfg = cfg
        self.actor_id = actor_id
        self.stop = stop or StopFlag()
        self.names = Names(transport.namespace)
        self.client = connect_role(transport)
        self.stats = ledger.StatsWriter(self.client, self.names, actor_id)  # run stats, each batch's added once
        self.registry = registry or CollectorRegistry()
        self.metrics: ActorMetrics = actor_metrics(self.registry)
        self.queue: StreamQueue[RolloutPrefix] = StreamQueue(
            self.client, self.names.rollouts, names=self.names, high_water=transport.high_water,
            max_bytes=transport.max_message_bytes,
        )
        self.backpressure_timeout_s = transport.backpressure_timeout_s
        self.engine: RolloutEngine = cfg.engine.build(cfg.model_dir)
        self.params = self.engine.num_parameters()
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
        self.prompts = load_prompts(cfg.prompts_file, tokenizer, use_chat_template=cfg.use_chat_template,
                                    add_bos=cfg.add_bos)
        if not self.prompts:
            raise ValueError(f"actor.prompts_file {cfg.prompts_file} holds no prompts")
        fit, too_long = prompts_that_fit(self.prompts, cfg.max_new_tokens, context_length(cfg.model_dir),
                                         path=cfg.prompts_file)
        if too_long:  # left out whole, never sampled (actors/prompts.py says why)
            self.metrics.prompts_skipped.labels(reason="too_long").inc(len(too_long))
            log.warning("%s: skipping %d of %d prompts of %s: too long for the context with actor.max_new_tokens=%d "
                        "(prompt indices %s%s)", actor_id, len(too_long), len(self.prompts), cfg.prompts_file,
                        cfg.max_new_tokens, too_long[:10], " ..." if len(too_long) > 10 else "")
        self.schedule: Schedule = cfg.schedule.build(cfg.max_new_tokens)
        # Seeded by id, not only index: compose replicas all have index 0 but distinct ids.
        self.rng = random.Random(f"{cfg.seed}:{index}:{actor_id}")
        # Probes draw from their own stream, so turning them on or off leaves prompts and horizons as they were.
        self.probe_rng = random.Random(f"{cfg.seed}:{index}:{actor_id}:probes")
        self.order = fit
        self.cursor = len(self.order)
        self.version = 0
        self.last_poll = 0.0
        self.admission = Admission(self.client, self.names, actor_id, lease_s=cfg.lease_s)
        self.heartbeat = Heartbeat(self.client, self.names, actor_id, lease_s=cfg.lease_s)
        self.summary = ActorSummary()
        self.failures = 0
        self.in_hand = 0  # admission slots of the batch being generated, not yet published

    def next_prompts(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            if self.cursor >= len(self.order):
                self.rng.shuffle(self.order)
                self.cursor = 0
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out

    def maybe_reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_poll < self.cfg.weights_poll_s:
            return
        self.last_poll = now
        ann = latest_weights(self.client, self.names)
        if ann is not None and ann.version > self.version:
            t0 = time.perf_counter()
            self.engine.load_weights(ann.path, ann.version)
            self.version = ann.version
            self.summary.reloads += 1
            self.metrics.weight_reloads.inc()
            log.info("%s: loaded policy v%d in %.2fs", self.actor_id, ann.version, time.perf_counter() - t0)
        self.metrics.policy_version.set(self.version)

    def learner_state(self) -> LearnerState:
        """What the schedule decides from: the learner's newest state or, before any learner published one
        (admission control off), a state assuming the version of the weights this actor holds."""
        state = self.admission.refresh()
        return state if isinstance(state, LearnerState) else LearnerState.assumed(self.version)

    def stopping(self) -> bool:
        return self.stop.is_set() or control_flag(self.client, self.names, "stop_producing") or (
            self.cfg.max_prefixes is not None and self.summary.prefixes >= self.cfg.max_prefixes
        )

    def step(self) -> int:
        """One batch: reserve slots, pick horizons, generate, publish. Returns prefixes published.

        Whatever ends the batch (published, the engine failed, the publish timed out on back-pressure or
        raised), the slots it did not publish are given back before `step` returns or raises: a slot is only
        ever kept by a process that is gone, and then its lease expires (actors/admission.py).
        """
        want = self.cfg.batch_size
        if self.cfg.max_prefixes is not None:
            want = min(want, self.cfg.max_prefixes - self.summary.prefixes)
        t0 = time.perf_counter()
        n = self.admission.acquire(want, self.stop, self.stopping) if self.cfg.admission_control else want
        self.metrics.admission_wait.inc(time.perf_counter() - t0)
        if n == 0:
            return 0
        self.in_hand = n if self.cfg.admission_control else 0
        batch: Batch | None = None
        try:
            batch = self.generate(n)
            if batch is not None:
                self.publish(batch)
        finally:
            self.in_hand = 0
            if self.cfg.admission_control:
                self.admission.release()
        if batch is None:  # a transient engine failure: back off (holding no slots), then try again
            self.stop.wait(min(30.0, 0.5 * 2**self.failures))
            return 0
        truth = [probe_saving(len(g.response_ids), h) for g, h, probe in zip(batch.gens, batch.horizons, batch.probes,
                                                                              strict=True)
                 if self.cfg.probe_truth and not probe and h < self.cfg.max_new_tokens]
        self.account(batch.horizons, batch.drawn, batch.probes, [(len(ids), fin) for ids, _, fin in batch.views],
                     prompt_tokens=sum(len(self.prompts[i]) for i in batch.indices), truth=truth)
        self.metrics.queue_depth.labels(stream=self.names.rollouts).set(self.queue.depth())
        return len(batch.gens)

    def generate(self, n: int) -> Batch | None:
        """Sample `n` prefixes with the newest weights; None after a transient engine failure (counted)."""
        self.maybe_reload(force=self.cfg.admission_control)  # sample with the newest published policy
        indices = self.next_prompts(n)
        drawn, probes, horizons = self.pick_horizons(self.learner_state(), len(indices))
        max_new = self.cfg.max_new_tokens
        try:
            gens = self.engine.generate(
                [self.prompts[i] for i in indices], [max_new] * len(horizons) if self.cfg.probe_truth else horizons,
                temperature=self.cfg.temperature, top_p=self.cfg.top_p, seed=self.rng.randrange(2**31),
            )
        except Exception as exc:
            if not self.engine.is_transient(exc):
                raise
            self.failures += 1
            if self.failures > self.engine.max_failures:
                raise RuntimeError(f"{self.actor_id}: {self.failures} engine failures in a row, last: {exc}") from exc
            log.warning("%s: generation failed (%s); retrying (%d/%d)", self.actor_id, exc, self.failures,
                        self.engine.max_failures)
            return None
        self.failures = 0
        versions = self.served_versions(gens)
        # Under actor.probe_truth every rollout ran to the budget; what is sent and charged is its first `horizon`
        # tokens (exactly a truncated rollout: sampling is autoregressive), the rest is the truth it measured.
        views = [(list(g.response_ids), list(g.logprobs), g.finished) if probe or not self.cfg.probe_truth
                 else truncated_view(g.response_ids, g.logprobs, g.finished, h)
                 for g, h, probe in zip(gens, horizons, probes, strict=True)]
        return Batch(indices, drawn, probes, horizons, gens, views, versions)

    def publish(self, batch: Batch) -> None:
        """Publish the batch in chunks that fit under the high-water mark; each chunk counted for this actor and
        spent from its lease in the publish script (protocol/streams.py)."""
        msgs = [RolloutPrefix.from_sample(
            self.prompts[idx], ids, lps,
            prompt_index=idx, horizon=horizon, max_new_tokens=self.cfg.max_new_tokens, finished=finished,
            policy_version=version, actor_id=self.actor_id,
            temperature=self.cfg.temperature, top_p=self.cfg.top_p, probe=probe,
        ) for idx, horizon, (ids, lps, finished), probe, version
            in zip(batch.indices, batch.horizons, batch.views, batch.probes, batch.versions, strict=True)]
        hw = self.queue.high_water  # one round trip per chunk that fits under the mark (docs/benchmarks.md)
        for chunk in (msgs[i:i + hw] for i in range(0, len(msgs), hw)):
            waited = self.queue.wait_for_room(timeout_s=self.backpressure_timeout_s, should_stop=self.stop.is_set,
                                              need=len(chunk))
            self.metrics.admission_wait.inc(waited)
            self.queue.publish_many(chunk, ledger_outcome=ledger.PRODUCED, producer=self.actor_id)
            self.in_hand = max(0, self.in_hand - len(chunk))

    def served_versions(self, gens: list[Generation]) -> list[int]:
        """The policy version each rollout was sampled with, and this actor's version moved to the server's.

        The engine's word where it has one (an SGLang server reports the weights it ran: several actors share
        it, and a restart puts it back on its launch weights), else the version this actor loaded. A server
        behind this actor (restarted, or reloaded by a lagging peer) makes the next step poll and reload the
        newest weights; one ahead (a peer loaded newer weights) is where this actor now stands. A server
        ahead of every version this run announced holds another run's weights, whose rollouts the learner
        would drop one by one as `future_version`: that stops the actor with a RuntimeError saying so.
        """
        versions = [self.version if g.policy_version is None else g.policy_version for g in gens]
        if not versions:
            return versions
        oldest, newest = min(versions), max(versions)
        if newest > self.version:
            ann = latest_weights(self.client, self.names)
            announced = 0 if ann is None else ann.version
            if newest > announced:
                raise RuntimeError(
                    f"{self.actor_id}: the rollout server sampled with weight version {newest}, but this run has "
                    f"announced at most v{announced}: it holds another run's weights; restart it (e.g. docker "
                    "compose restart student-sglang) so it serves the student it was launched with"
                )
        if oldest != self.version:
            log.info("%s: the server sampled with v%d, this actor had loaded v%d%s", self.actor_id, oldest,
                     self.version, ": reloading at the next step" if oldest < self.version else "")
            if oldest < self.version:
                self.last_poll = float("-inf")
            self.version = oldest
            self.metrics.policy_version.set(oldest)
        return versions

    def pick_horizons(self, state: LearnerState, n: int) -> tuple[list[int], list[bool], list[int]]:
        """(drawn, probe, horizon) per rollout: the schedule's horizons, which of them become probes, and what is sampled.

        A rollout the schedule truncates becomes a probe with probability `actor.probe_fraction` and is sampled to
        the whole budget instead; its drawn horizon is kept for the savings estimate (protocol/savings.py).
        """
        max_new = self.cfg.max_new_tokens
        drawn = [self.schedule.horizon(state, self.rng) for _ in range(n)]
        probes = [h < max_new and self.cfg.probe_fraction > 0 and self.probe_rng.random() < self.cfg.probe_fraction
                  for h in drawn]
        return drawn, probes, [max_new if p else h for h, p in zip(drawn, probes, strict=True)]

    def account(self, horizons: list[int], drawn: list[int], probes: list[bool], outcomes: list[tuple[int, bool]],
                *, prompt_tokens: int = 0, truth: list[int] | None = None) -> None:
        """Count one published batch: tokens generated, the budget bound, the probes' savings; metrics and run stats.

        `outcomes` holds (tokens generated, finished at EOS) per rollout; `prompt_tokens` is the batch's prompt
        tokens (prefilled: part of the generation FLOPs, `protocol/compute.py`). `truth` (actor.probe_truth): the
        true saving of each truncated rollout that was not a probe, recorded beside the estimate and not charged
        (the tokens past the horizon were generated to measure, as evaluation is: outside the budget).
        """
        max_new, s = self.cfg.max_new_tokens, self.summary
        bound = probe_tokens = budget = truncated = 0
        tally = ProbeTally()
        for horizon, h, probe, (generated, finished) in zip(horizons, drawn, probes, outcomes, strict=True):
            if probe:
                tally = tally.add(probe_saving(generated, h))
                probe_tokens += generated
            else:
                bound += saving_bound(horizon, max_new, finished)
                budget += max_new
                truncated += horizon < max_new
            self.metrics.horizon.observe(h)  # the schedule's horizon, a probe's included
        generated_total = sum(g for g, _ in outcomes)
        s.prefixes += len(outcomes)
        s.tokens_generated += generated_total
        s.tokens_saved += bound
        s.probe_tally += tally
        s.truncated += truncated
        self.metrics.prefixes.inc(len(outcomes))
        self.metrics.tokens_generated.inc(generated_total)
        self.metrics.tokens_saved_bound.inc(bound)
        self.metrics.probes.inc(tally.probes)
        est = estimate_savings(s.probe_tally, s.truncated)
        if est is not None:
            self.metrics.tokens_saved_estimate.set(est.tokens)
            self.metrics.tokens_saved_stderr.set(est.stderr if est.stderr is not None else float("inf"))
        # Forward pass per saved token: 2 x params FLOPs (the KV-cached decode cost); of the bound, as the
        # counter always was (the estimate is in the run stats, for the summary).
        self.metrics.compute_saved.labels(stage="actor_truncation").inc(2 * self.params * bound)
        self.stats.add(actor_prefixes=len(outcomes), actor_tokens_generated=generated_total,
                       actor_tokens_saved=bound, flops_saved_truncation=2 * self.params * bound,
                       actor_budget_tokens=budget, actor_truncated=truncated, actor_probes=tally.probes,
                       actor_probe_tokens=probe_tokens, probe_saving_sum=tally.saving_sum,
                       probe_saving_sq_sum=tally.saving_sq_sum, actor_prompt_tokens=prompt_tokens,
                       flops_generation=forward_flops(self.params, prompt_tokens + generated_total))
        if truth is not None and self.cfg.probe_truth:
            self.stats.add(truth_saving_sum=float(sum(truth)), truth_rollouts=len(truth))

    def run(self) -> ActorSummary:
        self.maybe_reload(force=True)
        log.info("%s: %d prompts, engine=%s, schedule=%s, %d params", self.actor_id, len(self.prompts),
                 self.cfg.engine.kind, self.cfg.schedule.kind, self.params)
        t0 = time.perf_counter()
        while not self.stopping():
            self.step()
            self.in_hand = 0
        dt = time.perf_counter() - t0
        log.info("%s: stopped after %d prefixes, %d tokens (%.0f tok/s); saved by truncation: at most %d (budget "
                 "bound), %s estimated from %d probes", self.actor_id, self.summary.prefixes,
                 self.summary.tokens_generated, self.summary.tokens_generated / max(dt, 1e-9), self.summary.tokens_saved,
                 self.summary.saved_estimate(), self.summary.probe_tally.probes)
        return self.summary

    def abandon(self) -> str:
        """A forced exit mid-batch (protocol/runtime.py StopFlag): what of the batch was not published was never
        recorded; its admission slots are given back (the in-flight budget must not shrink) and the actor leaves
        the registry (a draining learner waits for every registered actor)."""
        n, self.in_hand = self.in_hand, 0
        self.heartbeat.close()  # gives back every slot this actor holds and leaves the registry
        return f"a batch of {n} prefixes in hand, unpublished ones never recorded (admission slots released)" if n else ""


def run_actor(cfg: ActorConfig, transport: TransportConfig, *, actor_id: str, index: int = 0,
              stop: StopFlag | None = None) -> ActorSummary:
    """Entry point of `opd actor`: serve metrics, register (the heartbeat), loop until stopped, leave."""
    actor = Actor(cfg, transport, actor_id=actor_id, index=index, stop=stop)
    server = MetricsServer(actor.registry, host=cfg.metrics_host, port=cfg.metrics_port)
    register_endpoint(actor.client, actor.names, actor_id, server.url)
    actor.heartbeat.start()
    actor.stop.on_abandon(actor.abandon)
    log.info("%s: metrics at %s", actor_id, server.url)
    try:
        return actor.run()
    finally:
        actor.heartbeat.close()
        server.close()
