"""The learner: pull scored prefixes, drop the stale, train, commit, publish weights, checkpoint, evaluate.

The story, top to bottom:

- ``Learner.__init__`` loads the student, resumes (``learner/resume.py``: the newest checkpoint, then the
  step journal replayed after it) and publishes its weights and its ``LearnerState``
  (``learner/publish.py``): actors wait for that before producing.
- ``run`` loops until ``learner.steps`` (or the run's compute budget, ``learner.max_flops``): collect a batch
  (``learner/intake.py``: prefetched, copies refused, stale samples dropped, probes measured, one batch
  agreed across ranks), take one optimizer step (``learner/step.py``: token-budget micro-batches, the loss
  component ``cfg.loss.build()``), ``commit`` it, publish every ``learner.publish_every`` steps, record,
  checkpoint and evaluate when due.
- Then it drains (when to stop and the drain's start: ``learner/stopping.py``): producers are told to stop,
  what is in flight is trained, and the learner stops when no actor is registered and the ledger has
  nothing ``produced`` left; a last checkpoint, publish and evaluation close the run.

Delivery guarantee (details in ``learner/journal.py``, ``learner/inflight.py`` and ``docs/learner.md``): a
sample is acknowledged when the step that used it is committed, which journals its payload, acks and
deletes it from the scored stream and records it ``trained`` in the ledger, in one transaction. A learner
killed at any point (``SIGKILL`` included) and restarted resumes at its last committed step
(``learner/resume.py``): no acknowledged sample is lost, none is trained twice, and unacknowledged ones are
trained after the restart (or dropped, or dead-lettered after ``transport.max_deliveries`` deliveries).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import IO, Any

import torch
from prometheus_client import CollectorRegistry

from learner import resume, stopping
from learner.batching import pad_id_of
from learner.checkpoint import Stash, WriteFailed, save_checkpoint
from learner.config import LearnerConfig
from learner.distributed import Distributed, TrainModel, checksum
from learner.evaluate import HeldoutEvaluator
from learner.inflight import InFlight, LearnerQueue, consumer_name
from learner.intake import Intake, Prefetcher
from learner.journal import StepJournal
from learner.position_kl import PositionKL
from learner.publish import Publisher
from learner.step import StepStats, Trainer
from learner.summary import LearnerSummary
from protocol import ledger
from protocol.compute import train_flops
from protocol.config import TransportConfig
from protocol.files import check_model_dir
from protocol.messages import ScoredPrefix
from protocol.names import Names
from protocol.reconnect import OUTAGES
from protocol.runtime import StopFlag, held_entries, register_endpoint, resolve_device
from protocol.streams import Delivery, connect_role
from protocol.telemetry import LearnerMetrics, MetricsServer, learner_metrics

log = logging.getLogger(__name__)


class Learner:
    def __init__(self, cfg: LearnerConfig, transport: TransportConfig, *, learner_id: str = "learner",
                 stop: StopFlag | None = None, registry: CollectorRegistry | None = None,
                 dist: Distributed | None = None) -> None:
        self.cfg = cfg
        self.learner_id = learner_id
        self.stop = stop or StopFlag()
        self.dist = dist or Distributed()
        _check(cfg, transport, self.dist)
        self.device = self.dist.device(resolve_device(cfg.device))
        torch.manual_seed(cfg.seed)
        self.names = Names(transport.namespace)
        self.client = connect_role(transport)
        self.stats = ledger.StatsWriter(self.client, self.names, f"{learner_id}-rank{self.dist.rank}")  # once per step
        self.registry = registry or CollectorRegistry()
        self.metrics: LearnerMetrics = learner_metrics(self.registry)
        self.queue = LearnerQueue(
            self.client, self.names.scored, names=self.names, consumer=consumer_name(self.dist.rank),
            expect=ScoredPrefix, max_deliveries=transport.max_deliveries, claim_idle_ms=transport.claim_idle_ms,
            max_bytes=transport.max_message_bytes,
            on_dead_letter=lambda d: self.metrics.dead_letters.labels(stream=d.stream, reason=d.reason.split(":")[0]).inc(),
        )
        self.inflight = InFlight(self.queue)
        self.journal = StepJournal(self.client, self.names, stream=self.names.scored, group=self.queue.group,
                                   consumer=self.queue.consumer, rank=self.dist.rank,
                                   max_bytes=transport.max_message_bytes)
        self.position_kl = PositionKL(bucket_tokens=cfg.kl_bucket_tokens, buckets=cfg.kl_buckets,
                                      window_steps=cfg.kl_window_steps, history=cfg.kl_history)
        self.summary = LearnerSummary()
        self.intake = Intake(cfg, self.queue, self.inflight, self.journal, self.dist, self.stop, self.metrics,
                             self.summary, self.position_kl)
        self.intake.on_idle_after_drops = self.advertise  # drops free admission slots: say so while waiting
        # Keeps the ledger bounded (protocol/ledger.py `rollup`); rank 0 only: one suffices, several are harmless.
        self.ledger_rollup = ledger.PeriodicRollup(
            self.client, self.names, every_s=transport.ledger_rollup_every_s if self.dist.is_main else 0.0,
            keep_s=transport.ledger_keep_s,
            on_result=lambda r: (self.metrics.ledger_rolled_up.inc(r.folded), self.metrics.ledger_fields.set(r.fields)))
        self.workdir = Path(cfg.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._load_student()
        self.queue.vocab_size = int(self.model.config.vocab_size)  # token ids past it are dead-lettered, not trained
        self._outages_seen = OUTAGES.count  # Redis outages this process rode out (protocol/reconnect.py)
        self._resume()
        on_this_rank = self.dist.is_main or self.train_model.mode == "fsdp"  # FSDP forwards are collective
        self.evaluator = HeldoutEvaluator.maybe(cfg, self.tokenizer, self.device) if on_this_rank else None

    def _load_student(self) -> None:
        """Tokenizer, model (weights of the newest checkpoint, if any), optimizer; step and version restored."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.cfg
        check_model_dir(cfg.model_dir, "learner.model_dir")  # an unreadable file is named, not "No such file"
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32,
                                                          use_safetensors=True).to(self.device)
        self.model.train()
        self.params = sum(p.numel() for p in self.model.parameters())  # before any sharding
        restored = resume.restore(self.model, self.workdir / "checkpoints")
        self.step, self.version = restored.step, restored.version
        self.train_model = TrainModel(self.model, self.dist, fsdp=cfg.fsdp)
        self.trainer = Trainer(cfg, self.train_model, self.dist, self.device, pad_id_of(self.tokenizer))
        restored.apply(self.train_model, self.trainer.optimizer, self.trainer.scheduler)
        self.publisher = Publisher(cfg, self.client, self.names, self.dist, self.metrics, self.model,
                                   self.train_model, self.tokenizer, self.workdir)

    def _resume(self) -> None:
        """Replay the journal after the checkpoint, then tell the actors where the policy stands."""
        resume.replay(self)
        self.version = resume.move_version_forward(self.client, self.names, self.version)
        self.publisher.measured.update(resume.resume_measurements(
            self.client, self.names, self.position_kl, step=self.step, bucket_tokens=self.cfg.kl_bucket_tokens))
        self.publish()
        if self.dist.is_main and self.step < self.cfg.steps:  # a restarted run with steps to go wants rollouts again
            self.client.hdel(self.names.control, "stop_producing")
        self.advertise()  # early: actors wait for this before producing (admission control)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> LearnerSummary:
        """Train until done, drain, then checkpoint, publish and evaluate a last time."""
        self.evaluate()
        prefetch = self.intake.prefetcher()
        history = open(self.workdir / "history.jsonl", "a") if self.dist.is_main else None  # noqa: SIM115 (closed below)
        try:
            drain_error = self._loop(prefetch, history)
        finally:
            prefetch.close()
            if history is not None:
                history.close()
        saved = self.checkpoint()
        self.publish()
        if not self.stop.is_set() and (not self.cfg.eval.every or self.step % self.cfg.eval.every != 0):
            self.evaluate()  # not when told to stop: the checkpoint is what a restart needs, and it is written
        self.advertise(phase="done")
        if self.dist.enabled:
            self.check_replicas()
        log.info("learner %s: %d steps, %d samples trained, dropped %s", "stopped, checkpointed" if self.stop.is_set()
                 else "done", self.step, self.summary.trained, self.summary.dropped or "none")
        if drain_error is not None:
            raise drain_error
        if not saved and "checkpoint" in self.publisher.failures:  # exit 1; a restart with space writes it
            raise self.publisher.failures["checkpoint"]
        return self.summary

    def _loop(self, prefetch: Prefetcher, history: IO[str] | None) -> TimeoutError | None:
        """Steps until training is done and (``learner.drain``) what is in flight is trained; returns the
        error to raise once the run is closed when draining never finished."""
        cfg = self.cfg
        wall0, idle = time.perf_counter(), 0.0
        draining = False
        quiet_since: float | None = None
        while True:
            reason = None if draining else stopping.done_reason(self)
            if reason is not None:
                if not cfg.drain:
                    return None
                draining = True
                stopping.start_draining(self, reason)
            if self.publisher.stalled(self.version) and not self.stop.is_set():  # actors' weights too old: publish again
                self.publish()
                continue
            deadline = 2.0 if draining else cfg.read_timeout_s
            got = self.intake.collect(prefetch, version=self.version, deadline_s=deadline, draining=draining)
            idle += got.waited
            if got.stopping:
                return None  # what was read and not trained stays pending: taken back at the next start
            if got.total == 0:
                if not draining:
                    raise TimeoutError(f"no scored prefixes for {cfg.read_timeout_s:g}s: are teachers and actors running?")
                if got.drained:
                    return None
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > cfg.read_timeout_s:
                    return TimeoutError(self.intake.drain_report())
                continue
            quiet_since = None
            self._step(got.batch, history, idle=idle, wall0=wall0, waited=got.waited)

    def _step(self, batch: list[Delivery[ScoredPrefix]], history: IO[str] | None, *, idle: float, wall0: float, waited: float) -> None:
        """Train on the batch and commit it; publish, record, checkpoint and evaluate when due."""
        cfg = self.cfg
        stats = self.train_step([d.message for d in batch])
        self.commit(batch)
        self._track(batch)
        self.ledger_rollup.maybe_run()
        self.summary.steps += 1
        self.summary.trained += len(batch)
        if self.step % cfg.publish_every == 0:
            self.publish()  # before advertising the new version, so admitted work samples it
        self._record(stats, history, idle / max(time.perf_counter() - wall0, 1e-9), waited)
        if self.step % cfg.checkpoint_every == 0 or self._journal_lost():
            self.checkpoint()
        if cfg.eval.every and self.step % cfg.eval.every == 0:
            self.evaluate()

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self, messages: list[ScoredPrefix]) -> StepStats:
        """One optimizer step on this rank's share (``learner/step.py``); the policy version moves on."""
        stats = self.trainer.step(messages)
        self.step += 1
        self.version += 1
        return stats

    def commit(self, batch: list[Delivery[ScoredPrefix]]) -> None:
        """Acknowledge the step just taken: journal, ack and ledger ``trained`` in one script, then the lineage row
        (a crash between the two leaves the row to the replay: ``learner/journal.py``)."""
        self.journal.commit(self.step, self.version, batch)
        self.inflight.discard([d.entry_id for d in batch])
        self.record_lineage([d.message.id for d in batch], replayed=False)

    def record_lineage(self, ids: list[str], *, replayed: bool) -> None:
        """Which samples made which step (per rank): the audit trail of what the weights were trained on."""
        name = "trained_ids.jsonl" if self.dist.is_main else f"trained_ids.rank{self.dist.rank}.jsonl"
        with open(self.workdir / name, "a") as f:
            f.write(json.dumps({"step": self.step, "version": self.version, "ids": ids, "replayed": replayed}) + "\n")

    def _track(self, batch: list[Delivery[ScoredPrefix]]) -> None:
        """The step's samples into the KL by position; every `learner.kl_window_steps` steps the window closes
        (a sum and a max over the ranks) and the next state publishes it."""
        self.position_kl.add_trained(d.message for d in batch)
        if not self.position_kl.due(self.step):
            return
        sums, maxima = self.position_kl.pending()
        self.position_kl.close(self.step, self.dist.sum(sums), self.dist.max(maxima))
        self.publisher.measured.update(self.position_kl.published())

    def _record(self, s: StepStats, history: IO[str] | None, idle_fraction: float, waited_s: float) -> None:
        """The step's metrics; on rank 0 also its run stats (protocol/compute.py), history row and state."""
        s.export(self.metrics, version=self.version, idle_fraction=idle_fraction)
        self.metrics.queue_depth.labels(stream=self.names.scored).set(self.queue.depth())
        if history is None:
            return
        self.stats.add(learner_steps=1, learner_tokens=s.sequence_tokens,
                       learner_response_tokens=s.tokens, flops_learner=train_flops(self.params, s.sequence_tokens))
        row = s.history_row(step=self.step, version=self.version, waited_s=waited_s, idle_fraction=idle_fraction)
        history.write(json.dumps(row) + "\n")
        history.flush()
        self.advertise(loss=s.loss, reverse_kl=s.reverse_kl, support_kl=s.support_kl, tokens_per_second=s.tokens_per_second,
                       idle_fraction=min(idle_fraction, 1.0))

    # -- what the learner writes and tells ---------------------------------------------------------
    def publish(self) -> None:
        """Write the weights as an HF dir and announce the version (``learner/publish.py``)."""
        self.publisher.weights(version=self.version, step=self.step)

    def advertise(self, **measured: Any) -> None:
        """Publish the learner's `LearnerState` (``learner/publish.py``); `measured` updates its measurements."""
        self.publisher.state(version=self.version, step=self.step, **measured)

    def checkpoint(self) -> bool:
        """Durable checkpoint (rank 0 writes), then every rank forgets the journaled steps it contains. A full disk
        (``WriteFailed``) keeps the journal and trains on (docs/reliability.md, "Full disk"). Returns whether written."""
        model = self.publisher.saveable()
        optimizer: Any = self.trainer.optimizer
        if self.train_model.mode == "fsdp":
            optimizer = Stash()
            optimizer.load_state_dict(self.train_model.full_optimizer_state(self.trainer.optimizer))
        failed = 0.0
        if self.dist.is_main:
            try:
                path = save_checkpoint(self.workdir / "checkpoints", model, optimizer, self.trainer.scheduler,
                                       policy_version=self.version, step=self.step, keep_last=self.cfg.keep_checkpoints,
                                       extra={"stream": self.names.scored, "group": self.queue.group,
                                              "ranks": self.dist.world_size, "optimizer_keys": self.train_model.optimizer_keys})
                self.publisher.write_succeeded("checkpoint", path)
            except WriteFailed as exc:
                self.publisher.write_failed(exc)
                failed = 1.0
        if self.dist.max([failed])[0]:  # a collective: no rank forgets steps before the checkpoint is on disk
            return False
        self.journal.forget_through(self.step)
        return True

    def _journal_lost(self) -> bool:
        """After a Redis outage: did Redis come back without some of this rank's journal? Then checkpoint now.

        Several ranks would have to agree (a collective at every step): they rely on the journal's gap check
        at restart instead, which refuses to resume with a clear error (docs/reliability.md).
        """
        if self.dist.enabled or self._outages_seen == OUTAGES.count:
            return False
        self._outages_seen = OUTAGES.count
        if self.journal.intact():
            return False
        log.warning("Redis came back without some of this learner's journaled steps (a crash lost its last writes): "
                    "checkpointing now, so that a restart does not need them")
        return True

    def evaluate(self) -> None:
        if self.evaluator is None:
            return
        result = self.evaluator.run(self.model)
        if not self.dist.is_main:
            return
        row = {"step": self.step, "version": self.version, **result.row(), "time": time.time()}
        self.summary.evals.append(row)
        with open(self.workdir / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.metrics.eval_reverse_kl.set(result.reverse_kl)
        first = self.summary.evals[0]["reverse_kl"]
        self.advertise(eval_kl_first=first, eval_kl_last=result.reverse_kl)
        log.info("eval at step %d: held-out reverse KL %.4f (%d tokens)", self.step, result.reverse_kl, result.tokens)
        acc = result.accuracy
        if acc is not None:
            self.metrics.heldout_accuracy.set(acc.accuracy)
            ledger.set_stats(self.client, self.names, learner_eval_accuracy=acc.accuracy,
                             learner_eval_accuracy_first=self.summary.evals[0]["accuracy"])
            log.info("eval at step %d: held-out greedy exact match %d/%d (%.1f%%; %d ended with EOS)", self.step,
                     acc.correct, acc.total, 100 * acc.accuracy, acc.finished)

    def check_replicas(self) -> str:
        """Parameter checksum of this rank, stored in Redis; under DDP every rank must hold the same one.

        Why: DDP keeps replicas equal only if every rank applied every all-reduced step; a divergence (a
        rank that skipped a step, non-deterministic kernels) would silently train different models.
        """
        digest = checksum(self.model)
        self.client.hset(self.names.key("learner:replicas"), str(self.dist.rank), f"{self.step}:{digest}")
        if self.train_model.mode == "ddp":
            head = float(int(digest[:12], 16))  # 48 bits: exact in float64
            high, neg_low = self.dist.max([head, -head])
            if high != -neg_low:
                raise RuntimeError(f"DDP replicas diverged at step {self.step}: rank {self.dist.rank} holds {digest[:12]}")
        return digest


def _check(cfg: LearnerConfig, transport: TransportConfig, dist: Distributed) -> None:
    """Settings that only make sense together, checked before anything starts."""
    if not transport.redis_url:
        raise ValueError("transport.redis_url is required to run the learner")
    if dist.enabled and cfg.dist_timeout_s <= cfg.read_timeout_s:
        raise ValueError(f"learner.dist_timeout_s ({cfg.dist_timeout_s:.0f}) must exceed learner.read_timeout_s "
                         f"({cfg.read_timeout_s:.0f}): a rank may wait that long for data while the others wait for it")
    if cfg.batch_size < dist.world_size:
        raise ValueError(f"learner.batch_size ({cfg.batch_size}) is smaller than the number of ranks "
                         f"({dist.world_size}): every rank needs a share of each step")


def run_learner(cfg: LearnerConfig, transport: TransportConfig, *, learner_id: str = "learner",
                stop: StopFlag | None = None) -> LearnerSummary:
    """Entry point of `opd learner` (one process, or one rank under ``torchrun``)."""
    dist = Distributed.from_env(resolve_device(cfg.device), timeout_s=cfg.dist_timeout_s)
    try:
        learner = Learner(cfg, transport, learner_id=learner_id, stop=stop, dist=dist)
        port = cfg.metrics_port + dist.local_rank if cfg.metrics_port else 0  # one port per rank on a host
        server = MetricsServer(learner.registry, host=cfg.metrics_host, port=port)
        role_id = learner_id if dist.is_main else f"{learner_id}-rank{dist.rank}"
        register_endpoint(learner.client, learner.names, role_id, server.url)
        learner.stop.on_abandon(lambda: f"{held_entries(learner.queue)}, at step {learner.step}")
        log.info("%s: metrics at %s, device %s, rank %d/%d", role_id, server.url, learner.device, dist.rank,
                 dist.world_size)
        try:
            return learner.run()
        finally:
            server.close()
    finally:
        dist.close()
