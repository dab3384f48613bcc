"""The learner: pull scored prefixes, drop the stale, train, commit, publish weights, checkpoint, evaluate.

Read top to bottom: `Learner.__init__` (model, optimizer, resume = newest checkpoint + replay of the step
journal after it), `next_batch` (staleness filter, idle time), `train_step` (token-budget micro-batches,
gradient accumulation; with several ranks they agree on the normalizer and the micro-batch count),
`commit` (acknowledge), `run` (the loop and the drain at the end).

Delivery guarantee (details in ``learner/journal.py``, ``learner/inflight.py`` and ``docs/learner.md``): a
sample is acknowledged when the step that used it is committed, which journals its payload, acks and
deletes it from the scored stream and records it ``trained`` in the ledger, in one transaction. A learner
killed at any point (``SIGKILL`` included) and restarted loads the newest checkpoint, replays the journaled
steps after it, and takes back at once what it had read but not committed: no acknowledged sample is lost,
none is trained twice, and unacknowledged ones are trained after the restart (or dropped, or
dead-lettered after ``transport.max_deliveries`` deliveries).

Policy versions only move forward: the replayed state is the last committed step, which is at least the
last version announced (a step is committed before its weights are published). Should Redis have lost the
journal, the learner continues one version above the last announcement, so actors (which load only newer
versions) follow it and no version number ever names two different sets of weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from learner.batching import Batch, Sample, collate, pack_by_tokens
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.config import LearnerConfig
from learner.distributed import Distributed, TrainModel, allocate, checksum
from learner.evaluate import HeldoutEvaluator
from learner.inflight import InFlight, LearnerQueue, consumer_name
from learner.journal import StepJournal, orphaned_journals
from learner.losses import LossOutput, token_weights
from learner.position_kl import PositionKL
from learner.publish import publish_weights
from learner.staleness import split_by_staleness
from protocol import ledger
from protocol.compute import ComputeTally, format_flops, train_flops
from protocol.config import TransportConfig
from protocol.files import check_model_dir
from protocol.messages import ScoredPrefix, WeightsAnnouncement
from protocol.names import Names
from protocol.reconnect import OUTAGES, RedisUnavailable
from protocol.runtime import StopFlag, announce_weights, latest_weights, register_endpoint, resolve_device
from protocol.state import LearnerState, publish_state, read_state
from protocol.streams import Delivery, connect_role
from protocol.telemetry import LearnerMetrics, MetricsServer, learner_metrics

log = logging.getLogger(__name__)

_ROUND_S = 0.5  # several ranks: longest a rank waits for data between two agreements on the batch


@dataclass
class StepStats:
    loss: float
    reverse_kl: float
    tokens: int
    samples: int = 0
    ratio_mean: float = 1.0
    ratio_max: float = 1.0
    clip_fraction: float = 0.0
    padding_fraction: float = 0.0
    seconds: float = 0.0
    sequence_tokens: int = 0  # prompt + response tokens forwarded and back-propagated (protocol/compute.py)


@dataclass
class LearnerSummary:
    steps: int = 0
    trained: int = 0
    replayed_steps: int = 0
    duplicates: int = 0
    probes: int = 0  # full-length probe rollouts measured, never trained on
    dropped: dict[str, int] = field(default_factory=dict)
    evals: list[dict[str, float]] = field(default_factory=list)


class Prefetcher:
    """Reads the next deliveries on a thread while the current step trains (I/O overlaps compute).

    The buffer hands out the oldest policy version first: replicas finish out of order, and training
    the oldest samples first keeps them inside the staleness bound. Entries this consumer read before a
    restart come first; everything read is tracked in ``inflight`` and kept claimed until committed.
    ``admit`` filters each read before it is buffered (the journal refuses copies of trained ids).
    """

    def __init__(self, q: LearnerQueue, inflight: InFlight, batch_size: int, stop: StopFlag,
                 admit: Callable[[list[Delivery]], list[Delivery]] = lambda ds: ds) -> None:
        self.q = q
        self.inflight = inflight
        self.admit = admit
        self.capacity = 2 * batch_size
        self.buffer: queue.PriorityQueue[tuple[int, int, Delivery]] = queue.PriorityQueue()
        self._seq = 0
        self.batch_size = batch_size
        self.stop = stop
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._put(q.recover_own())
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.thread.start()

    def _put(self, deliveries: list[Delivery]) -> None:
        deliveries = self.admit(deliveries)
        self.inflight.add([d.entry_id for d in deliveries])
        for d in deliveries:
            self._seq += 1
            self.buffer.put((d.message.policy_version, self._seq, d))  # type: ignore[union-attr]

    def _run(self) -> None:
        try:
            while not self._halt.is_set() and not self.stop.is_set():
                self.inflight.refresh_if_due()  # before any read: this thread is the only one reclaiming
                room = self.capacity - self.buffer.qsize()
                if room <= 0:
                    self._halt.wait(0.005)
                    continue
                self._put(self.q.read(min(room, self.batch_size), block_ms=200))
        except BaseException as exc:  # surfaced in the main thread
            self.error = exc

    def get(self, timeout: float) -> Delivery | None:
        if isinstance(self.error, RedisUnavailable):  # one clear line (the CLI prints it), not a traceback
            raise RedisUnavailable(f"reading {self.q.stream}: {self.error}")
        if self.error is not None:
            raise RuntimeError(f"reading {self.q.stream} failed: {self.error}") from self.error
        try:
            return self.buffer.get(timeout=timeout)[2]
        except queue.Empty:
            return None

    def close(self) -> None:
        self._halt.set()
        self.thread.join(timeout=5)


class _Stash:
    """Receives optimizer/scheduler state from `load_checkpoint` before the real objects exist.

    Why: under FSDP the optimizer must be built on the sharded parameters, and the weights must be loaded
    before sharding; so the checkpoint is read first and its optimizer state applied afterwards.
    """

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = state_dict


class _FullWeights:
    """An HF model plus its gathered (unsharded) weights, saved as a plain HF directory (FSDP)."""

    def __init__(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self.module = module
        self.weights = weights

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any:
        return self.module.save_pretrained(save_directory, state_dict=self.weights, **kwargs)  # type: ignore[operator]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
        raise NotImplementedError("gathered weights are written, never loaded")


class Learner:
    def __init__(self, cfg: LearnerConfig, transport: TransportConfig, *, learner_id: str = "learner",
                 stop: StopFlag | None = None, registry: CollectorRegistry | None = None,
                 dist: Distributed | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not transport.redis_url:
            raise ValueError("transport.redis_url is required to run the learner")
        self.cfg = cfg
        self.learner_id = learner_id
        self.stop = stop or StopFlag()
        self.dist = dist or Distributed()
        if self.dist.enabled and cfg.dist_timeout_s <= cfg.read_timeout_s:
            raise ValueError(f"learner.dist_timeout_s ({cfg.dist_timeout_s:.0f}) must exceed learner.read_timeout_s "
                             f"({cfg.read_timeout_s:.0f}): a rank may wait that long for data while the others wait for it")
        if cfg.batch_size < self.dist.world_size:
            raise ValueError(f"learner.batch_size ({cfg.batch_size}) is smaller than the number of ranks "
                             f"({self.dist.world_size}): every rank needs a share of each step")
        self.device = self.dist.device(resolve_device(cfg.device))
        torch.manual_seed(cfg.seed)
        self.names = Names(transport.namespace)
        self.client = connect_role(transport)
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
        self.local_batch = self.dist.share(cfg.batch_size)
        self.loss = cfg.loss.build()
        self._measured: dict[str, Any] = {}  # the latest measurements, republished with every state
        self.position_kl = PositionKL(bucket_tokens=cfg.kl_bucket_tokens, buckets=cfg.kl_buckets,
                                      window_steps=cfg.kl_window_steps, history=cfg.kl_history)
        self.workdir = Path(cfg.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        check_model_dir(cfg.model_dir, "learner.model_dir")  # an unreadable file is named, not "No such file"
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
        self.pad_id = _pad_id(self.tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32).to(self.device)
        self.model.train()
        self.params = sum(p.numel() for p in self.model.parameters())  # before any sharding
        self.step = 0
        self.version = 0
        ckpt = latest_checkpoint(self.workdir / "checkpoints")
        saved_optimizer, saved_scheduler = _Stash(), _Stash()
        if ckpt is not None:
            meta = load_checkpoint(ckpt, self.model, saved_optimizer, saved_scheduler)
            self.step, self.version = int(meta["step"]), int(meta["policy_version"])
        self.train_model = TrainModel(self.model, self.dist, fsdp=cfg.fsdp)
        self.optimizer = torch.optim.AdamW(self.train_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        if ckpt is not None:
            keys = meta.extra.get("optimizer_keys", "indices")
            if keys != self.train_model.optimizer_keys:
                raise ValueError(f"{ckpt}: optimizer state keyed by parameter {keys}, this run needs "
                                 f"{self.train_model.optimizer_keys} (learner.fsdp differs from the run that wrote it)")
            self.train_model.load_optimizer_state(self.optimizer, saved_optimizer.state)
            self.scheduler.load_state_dict(saved_scheduler.state)
            log.info("resumed from %s at step %d, policy v%d", ckpt, self.step, self.version)
        self.summary = LearnerSummary()
        self._held: list[Delivery] = []  # several ranks: fresh samples held over for the next step
        self._outages_seen = OUTAGES.count  # Redis outages this process rode out (protocol/reconnect.py)
        self._replay()
        self._move_version_forward()
        self._resume_measurements()
        self.publish()
        if self.dist.is_main and self.step < cfg.steps:  # a restarted run with steps to go wants rollouts again
            self.client.hdel(self.names.control, "stop_producing")
        self.advertise()  # early: actors wait for this before producing (admission control)
        on_this_rank = self.dist.is_main or self.train_model.mode == "fsdp"  # FSDP forwards are collective
        self.evaluator = HeldoutEvaluator.maybe(cfg, self.tokenizer, self.device) if on_this_rank else None

    # -- restart -------------------------------------------------------------------------------------
    def _replay(self) -> None:
        """Re-run the journaled steps after the restored checkpoint: the state at the last committed step."""
        after = self.step
        orphans = orphaned_journals(self.client, self.names, self.dist.world_size)
        if orphans:
            raise ValueError(f"the journals of ranks {sorted(orphans)} hold {sum(orphans.values())} committed samples that "
                             f"only those ranks can replay: restart with {max(orphans) + 1} ranks (this run has "
                             f"{self.dist.world_size})")
        steps = self.journal.load(after_step=after)
        last, version = (steps[-1].step, steps[-1].version) if steps else (after, self.version)
        if self.dist.enabled:  # ranks may differ by the step one of them was killed before committing
            last, version = (int(v) for v in self.dist.max([last, version]))
        by_step = {js.step: js for js in steps}
        for s in range(after + 1, last + 1):
            js = by_step.get(s)
            self.train_step(js.messages if js is not None else [])
            if js is None:  # this rank died before committing its share: it is still pending, trained later
                self.journal.commit(self.step, self.version, [])
            self._lineage([m.id for m in js.messages] if js is not None else [], replayed=True)
            self.summary.replayed_steps += 1
        if last > after:
            self.version = max(self.version, version)
            log.info("replayed %d journaled steps after the checkpoint: now at step %d, policy v%d",
                     last - after, self.step, self.version)

    def _move_version_forward(self) -> None:
        ann = latest_weights(self.client, self.names)
        if ann is not None and ann.version > self.version:
            log.warning("weights v%d were announced but the restored state is v%d (the journal was lost?): "
                        "continuing as v%d so actors, which load only newer versions, follow", ann.version,
                        self.version, ann.version + 1)
            self.version = ann.version + 1

    # -- data ----------------------------------------------------------------------------------
    def next_batch(self, prefetch: Prefetcher, want: int, *, deadline_s: float) -> tuple[list[Delivery], float]:
        """`want` fresh samples (fewer only when draining ends); stale ones are acked as dropped."""
        kept: list[Delivery] = []
        waited = 0.0
        start = time.monotonic()
        while len(kept) < want:
            t0 = time.perf_counter()
            d = prefetch.get(timeout=0.2)
            waited += time.perf_counter() - t0
            if d is None:
                if self.stop.is_set() or time.monotonic() - start > deadline_s:
                    break
                continue
            if self._fresh(d):
                kept.append(d)
        return kept, waited

    def _admit(self, deliveries: list[Delivery]) -> list[Delivery]:
        """The deliveries that may be trained: copies of ids already trained or in flight are refused."""
        admitted, refused = self.journal.refuse_duplicates(deliveries)
        if refused:
            self.metrics.duplicates.inc(len(refused))
            self.summary.duplicates += len(refused)
        return admitted

    def _fresh(self, d: Delivery) -> bool:
        """Within the staleness bound at the current version; otherwise acked as dropped, with its reason."""
        split = split_by_staleness([d.message], learner_version=self.version, max_staleness=self.cfg.max_staleness)
        lag = self.version - d.message.policy_version  # type: ignore[union-attr]
        self.metrics.staleness.observe(max(lag, 0))
        if split.kept and getattr(d.message, "probe", False):
            self._measure_probe(d)
            return False
        if split.kept:
            return True
        reason = split.dropped[0].reason
        log.debug("dropped %s: v%d at learner v%d (%s)", d.message.id, d.message.policy_version, self.version, reason)  # type: ignore[union-attr]
        self.queue.ack([d.entry_id], ledger={d.message.id: ledger.DROPPED})  # type: ignore[union-attr]
        self.inflight.discard([d.entry_id])
        self.metrics.dropped.labels(reason=reason).inc()
        self.summary.dropped[reason] = self.summary.dropped.get(reason, 0) + 1
        return False

    def _measure_probe(self, d: Delivery) -> None:
        """A fresh probe: its KL by position goes into the open window; acked untrained (ledger `dropped`).

        Why never trained: a probe is an honest on-policy full rollout, but training on it would change what
        a schedule trains on (at a 0.1 horizon, 5% of full-length probes would be about a third of the trained
        tokens), and the experiment compares schedules. Measuring costs no forward pass.
        """
        self.position_kl.add_probe(d.message)  # type: ignore[arg-type]
        self.queue.ack([d.entry_id], ledger={d.message.id: ledger.DROPPED})  # type: ignore[union-attr]
        self.inflight.discard([d.entry_id])
        self.metrics.probes.inc()
        self.summary.probes += 1
        ledger.add_stats(self.client, self.names, learner_probes=1)

    def _track(self, batch: list[Delivery]) -> None:
        """The step's samples into the KL by position; every `learner.kl_window_steps` steps the window closes
        (a sum and a max over the ranks) and the next state publishes it."""
        self.position_kl.add_trained(d.message for d in batch)  # type: ignore[misc]
        if not self.position_kl.due(self.step):
            return
        sums, maxima = self.position_kl.pending()
        self.position_kl.close(self.step, self.dist.sum(sums), self.dist.max(maxima))
        self._measured.update(self.position_kl.published())

    def _resume_measurements(self) -> None:
        """A restarted learner takes back the KL windows it had published, up to the step it resumed at, so the
        adaptive schedule does not start over (a fresh run, at step 0, starts with none)."""
        state = read_state(self.client, self.names) if self.step > 0 else None
        if isinstance(state, LearnerState) and state.bucket_tokens == self.cfg.kl_bucket_tokens:
            self.position_kl.resume(state.kl_windows, through_step=self.step)
            self._measured.update(self.position_kl.published())

    def _collect(self, prefetch: Prefetcher, *, deadline_s: float, draining: bool) -> tuple[list[Delivery], float, int, bool, bool]:
        """This rank's batch for the next step: ``(batch, seconds waited, samples over all ranks, stop, drained)``.

        One process: wait for ``batch_size`` fresh samples or the deadline. Several ranks: rounds of at most
        `_ROUND_S` in which each rank waits for its share and takes whatever else is already buffered, then
        the ranks gather their counts and step as soon as they hold a global batch together (or a rank's
        deadline passed, or one is stopping); `allocate` splits the batch, and surplus samples stay held
        (still claimed) for the next step.
        """
        if not self.dist.enabled:
            batch, waited = self.next_batch(prefetch, self.cfg.batch_size, deadline_s=deadline_s)
            return batch, waited, len(batch), self.stop.is_set(), draining and not batch and self._drained()
        target = self.cfg.batch_size
        held = [d for d in self._held if self._fresh(d)]  # one version later: re-check the bound
        waited, start = 0.0, time.monotonic()
        while True:
            if len(held) < self.local_batch:
                got, w = self.next_batch(prefetch, self.local_batch - len(held), deadline_s=_ROUND_S)
                held += got
                waited += w
            while len(held) < target and (d := prefetch.get(timeout=0)) is not None:
                if self._fresh(d):
                    held.append(d)
            late = time.monotonic() - start > deadline_s
            drained = draining and not held and self._drained()
            counts = self.dist.gather(len(held))
            stop_any, late_any, undrained_any = self.dist.max([float(self.stop.is_set()), float(late), float(not drained)])
            total = sum(counts)
            if stop_any or total >= target or late_any or (draining and not undrained_any):
                take = allocate(counts, target, self.dist.shares(target))[self.dist.rank]
                self._held = held[take:]
                return held[:take], waited, min(total, target), bool(stop_any), not bool(undrained_any)

    # -- math ----------------------------------------------------------------------------------
    def train_step(self, messages: list[ScoredPrefix]) -> StepStats:
        """One optimizer step on this rank's share (possibly empty when several ranks train).

        Every rank runs the same number of micro-batches (padding with a zero-loss one) so the collectives
        inside the forward (FSDP) and the one gradient all-reduce per step (DDP) line up; the loss is
        normalised by all ranks' response tokens so the step is the token mean over the global batch.
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        samples = [Sample.from_record(m) for m in messages]
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        groups = pack_by_tokens(lengths, cfg.micro_batch_tokens) if samples else []
        local_tokens = sum(len(s.response_ids) for s in samples)
        total_tokens, total_samples, n_micro = local_tokens, len(samples), len(groups)
        sequence_tokens = sum(lengths)
        if self.dist.enabled:
            total_tokens, total_samples, sequence_tokens = (
                int(v) for v in self.dist.sum([local_tokens, len(samples), sequence_tokens]))
            n_micro = int(self.dist.max([len(groups)])[0])
        # DDP and FSDP average gradients over ranks, hence the division by the world size.
        normalizer = max(total_tokens, 1) / self.dist.world_size
        self.optimizer.zero_grad(set_to_none=True)
        acc = {"loss": 0.0, "kl": 0.0, "rmean": 0.0, "rmax": 0.0, "clip": 0.0, "pad": 0.0, "slots": 0.0}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        for i in range(n_micro):
            with self.train_model.grad_sync(i == n_micro - 1):
                if i >= len(groups):
                    self._empty_micro_batch(autocast)
                    continue
                batch = collate([samples[j] for j in groups[i]], self.pad_id).to(self.device)
                with autocast:
                    logits_BTV = self.train_model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
                out = self._loss(batch, logits_BTV, normalizer=normalizer)
                out.loss.backward()
            n = float(out.tokens)
            acc["loss"] += float(out.loss.detach())
            acc["kl"] += float(out.reverse_kl) * n
            if out.ratio_mean is not None:
                acc["rmean"] += float(out.ratio_mean) * n
                acc["rmax"] = max(acc["rmax"], float(out.ratio_max))
                acc["clip"] += float(out.clip_fraction) * n
            slots = batch.attention_mask_BT.numel()
            acc["pad"] += batch.padding_fraction * slots
            acc["slots"] += slots
        torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.version += 1
        if self.dist.enabled:
            keys = ("loss", "kl", "rmean", "clip", "pad", "slots")
            for key, value in zip(keys, self.dist.sum([acc[k] for k in keys]), strict=True):
                acc[key] = value
            acc["loss"] /= self.dist.world_size
            acc["rmax"] = self.dist.max([acc["rmax"]])[0]
        denom = max(total_tokens, 1)
        return StepStats(
            loss=acc["loss"], reverse_kl=acc["kl"] / denom, tokens=total_tokens, samples=total_samples,
            ratio_mean=acc["rmean"] / denom if acc["rmean"] else 1.0, ratio_max=acc["rmax"] or 1.0,
            clip_fraction=acc["clip"] / denom, padding_fraction=acc["pad"] / max(acc["slots"], 1),
            seconds=time.perf_counter() - t0, sequence_tokens=sequence_tokens,
        )

    def _empty_micro_batch(self, autocast: contextlib.AbstractContextManager[Any]) -> None:
        """A forward/backward that changes nothing, for a rank with fewer micro-batches than the others."""
        ids_BT = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        with autocast:
            logits_BTV = self.train_model(input_ids=ids_BT, attention_mask=torch.ones_like(ids_BT)).logits
        (logits_BTV.float().sum() * 0.0).backward()

    def _loss(self, batch: Batch, logits_BTV: torch.Tensor, *, normalizer: float) -> LossOutput:
        """The configured loss component (``learner.loss``), with the per-token weights the config asks for."""
        weights_BT = token_weights(batch, position_gamma=self.cfg.position_gamma,
                                   horizon_discount_factor=self.cfg.horizon_discount)
        return self.loss(batch, logits_BTV, weights_BT=weights_BT, normalizer=normalizer)

    # -- side effects ----------------------------------------------------------------------------
    def commit(self, batch: list[Delivery]) -> None:
        """Acknowledge the step just taken: journal, ack and ledger ``trained`` in one transaction."""
        self.journal.commit(self.step, self.version, batch)
        self.inflight.discard([d.entry_id for d in batch])
        self._lineage([d.message.id for d in batch], replayed=False)  # type: ignore[union-attr]

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

    def _lineage(self, ids: list[str], *, replayed: bool) -> None:
        """Which samples made which step (per rank): the audit trail of what the weights were trained on."""
        name = "trained_ids.jsonl" if self.dist.is_main else f"trained_ids.rank{self.dist.rank}.jsonl"
        with open(self.workdir / name, "a") as f:
            f.write(json.dumps({"step": self.step, "version": self.version, "ids": ids, "replayed": replayed}) + "\n")

    def advertise(self, **measured: Any) -> None:
        """Publish the learner's `LearnerState` (protocol/state.py): admission control, schedules and `opd top`
        read it. `measured` updates the measurements carried along (phase, loss, held-out KL, ...)."""
        if not self.dist.is_main:
            return
        self._measured.update(measured)
        # `retired` is read now, after the weights of `version` are published: actors admit new work
        # against it, so a slot freed by this step is only taken by work sampled with this step's weights.
        retired = sum(ledger.counts(self.client, self.names)[o] for o in ledger.TERMINAL)
        publish_state(self.client, self.names, LearnerState(
            version=self.version, step=self.step, batch_size=self.cfg.batch_size, max_staleness=self.cfg.max_staleness,
            ranks=self.dist.world_size, retired=retired, **self._measured,
        ))

    def _saveable(self) -> Any:
        """What checkpoint/publish write: the model itself, or (FSDP, a collective) its gathered weights."""
        if self.train_model.mode != "fsdp":
            return self.model
        return _FullWeights(self.model, self.train_model.full_state_dict())

    def publish(self) -> None:
        """Write the weights as an HF dir and announce the version (rank 0; every rank gathers under FSDP)."""
        t0 = time.perf_counter()
        model = self._saveable()
        if not self.dist.is_main:
            return
        path, nbytes = publish_weights(model, self.workdir / "weights", self.version, self.cfg.keep_published,
                                       tokenizer=self.tokenizer)
        announce_weights(self.client, self.names, WeightsAnnouncement(
            version=self.version, path=str(Path(path).resolve()), step=self.step, nbytes=nbytes))
        dt = time.perf_counter() - t0
        self.metrics.publish_seconds.set(dt)
        self.metrics.publish_bytes.inc(nbytes)
        self.metrics.policy_version.set(self.version)

    def checkpoint(self) -> None:
        """Durable checkpoint (rank 0 writes), then every rank forgets the journaled steps it contains."""
        model = self._saveable()
        optimizer: Any = self.optimizer
        if self.train_model.mode == "fsdp":
            optimizer = _Stash()
            optimizer.load_state_dict(self.train_model.full_optimizer_state(self.optimizer))
        if self.dist.is_main:
            save_checkpoint(self.workdir / "checkpoints", model, optimizer, self.scheduler,
                            policy_version=self.version, step=self.step, keep_last=self.cfg.keep_checkpoints,
                            extra={"stream": self.names.scored, "group": self.queue.group, "ranks": self.dist.world_size,
                                   "optimizer_keys": self.train_model.optimizer_keys})
        self.dist.barrier()  # no rank drops journal entries before the checkpoint holding them is on disk
        self.journal.forget_through(self.step)

    def evaluate(self) -> None:
        if self.evaluator is None:
            return
        result = self.evaluator.run(self.model)
        if not self.dist.is_main:
            return
        row = {"step": self.step, "version": self.version, "reverse_kl": result.reverse_kl,
               "tokens": result.tokens, "mean_response_len": result.mean_response_len, "time": time.time()}
        self.summary.evals.append(row)
        with open(self.workdir / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.metrics.eval_reverse_kl.set(result.reverse_kl)
        first = self.summary.evals[0]["reverse_kl"]
        self.advertise(eval_kl_first=first, eval_kl_last=result.reverse_kl)
        log.info("eval at step %d: held-out reverse KL %.4f (%d tokens)", self.step, result.reverse_kl, result.tokens)

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

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> LearnerSummary:
        cfg = self.cfg
        self.evaluate()
        prefetch = Prefetcher(self.queue, self.inflight, self.local_batch, self.stop, admit=self._admit)
        history = open(self.workdir / "history.jsonl", "a") if self.dist.is_main else None  # noqa: SIM115 (closed below)
        wall0, idle = time.perf_counter(), 0.0
        draining = False
        quiet_since: float | None = None
        drain_error: TimeoutError | None = None
        try:
            while True:
                reason = None if draining else self._done_reason()
                if reason is not None:
                    if not cfg.drain:
                        break
                    draining = True
                    if self.dist.is_main:
                        self.client.hset(self.names.control, "stop_producing", "1")
                    self.advertise(phase="draining")
                    log.info("%s: draining in-flight prefixes", reason)
                deadline = 2.0 if draining else cfg.read_timeout_s
                batch, waited, total, stopping, drained = self._collect(prefetch, deadline_s=deadline, draining=draining)
                idle += waited
                if stopping:
                    break  # what was read and not trained stays pending: taken back at the next start
                if total == 0:
                    if not draining:
                        raise TimeoutError(f"no scored prefixes for {cfg.read_timeout_s:g}s: are teachers and actors running?")
                    if drained:
                        break
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > cfg.read_timeout_s:
                        drain_error = TimeoutError(self._drain_report())
                        break
                    continue
                quiet_since = None
                stats = self.train_step([d.message for d in batch])  # type: ignore[misc]
                self.commit(batch)
                self._track(batch)
                self.summary.steps += 1
                self.summary.trained += len(batch)
                if self.step % cfg.publish_every == 0:
                    self.publish()  # before advertising the new version, so admitted work samples it
                self._record(stats, history, idle / max(time.perf_counter() - wall0, 1e-9), waited)
                if self.step % cfg.checkpoint_every == 0 or self._journal_lost():
                    self.checkpoint()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
        finally:
            prefetch.close()
            if history is not None:
                history.close()
        self.checkpoint()
        self.publish()
        if not cfg.eval.every or self.step % cfg.eval.every != 0:
            self.evaluate()
        self.advertise(phase="done")
        if self.dist.enabled:
            self.check_replicas()
        log.info("learner done: %d steps, %d samples trained, dropped %s", self.step, self.summary.trained,
                 self.summary.dropped or "none")
        if drain_error is not None:
            raise drain_error
        return self.summary

    def _done_reason(self) -> str | None:
        """Why training should stop now (`learner.steps` reached, or the run's FLOPs reached `learner.max_flops`), or None.

        The FLOPs are the run stats every role adds to (protocol/compute.py), so the budget covers generation and
        teacher scoring too; under several ranks they agree through a max, as they read Redis at different times.
        """
        if self.step >= self.cfg.steps:
            return f"reached {self.cfg.steps} steps"
        if self.cfg.max_flops is None:
            return None
        spent = ComputeTally.from_stats(ledger.stats(self.client, self.names)).total
        over = spent >= self.cfg.max_flops
        if self.dist.enabled:
            over = bool(self.dist.max([float(over)])[0])
        if not over:
            return None
        return (f"spent the compute budget at step {self.step} ({format_flops(spent)} of learner.max_flops="
                f"{format_flops(self.cfg.max_flops)})")

    def _drained(self) -> bool:
        """Nothing in flight and no actor still producing: the run's books are closed."""
        return int(self.client.scard(self.names.key("actors"))) == 0 and ledger.counts(self.client, self.names)[ledger.PRODUCED] == 0

    def _drain_report(self) -> str:
        actors = sorted(a.decode() for a in self.client.smembers(self.names.key("actors")))
        produced = ledger.counts(self.client, self.names)[ledger.PRODUCED]
        return (f"draining: no scored prefix for {self.cfg.read_timeout_s:g}s while {produced} prefixes are still "
                f"in flight (ledger 'produced') and actors {actors or 'none'} are registered; trained steps are "
                "checkpointed and published, the rest was not accounted for")

    def _record(self, s: StepStats, history: Any, idle_fraction: float, waited_s: float) -> None:
        m = self.metrics
        tps = s.tokens / max(s.seconds, 1e-9)
        m.steps.inc()
        m.loss.set(s.loss)
        m.reverse_kl.set(s.reverse_kl)
        m.tokens_trained.inc(s.tokens)
        m.tokens_per_second.set(tps)
        m.policy_version.set(self.version)
        m.idle_fraction.set(idle_fraction)
        m.ratio_mean.set(s.ratio_mean)
        m.ratio_max.set(s.ratio_max)
        m.clip_fraction.set(s.clip_fraction)
        m.padding_fraction.set(s.padding_fraction)
        m.queue_depth.labels(stream=self.names.scored).set(self.queue.depth())
        if history is None:
            return
        ledger.add_stats(self.client, self.names, learner_steps=1, learner_tokens=s.sequence_tokens,
                         learner_response_tokens=s.tokens, flops_learner=train_flops(self.params, s.sequence_tokens))
        row = {"step": self.step, "version": self.version, "loss": s.loss, "reverse_kl": s.reverse_kl, "tokens": s.tokens,
               "samples": s.samples, "seconds": s.seconds, "waited_s": waited_s, "tokens_per_second": tps,
               "idle_fraction": idle_fraction,
               "ratio_mean": s.ratio_mean, "ratio_max": s.ratio_max, "clip_fraction": s.clip_fraction,
               "padding_fraction": s.padding_fraction, "time": time.time()}
        history.write(json.dumps(row) + "\n")
        history.flush()
        self.advertise(loss=s.loss, reverse_kl=s.reverse_kl, tokens_per_second=tps, idle_fraction=min(idle_fraction, 1.0))


def _pad_id(tokenizer) -> int:  # type: ignore[no-untyped-def]
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


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
        log.info("%s: metrics at %s, device %s, rank %d/%d", role_id, server.url, learner.device, dist.rank,
                 dist.world_size)
        try:
            return learner.run()
        finally:
            server.close()
    finally:
        dist.close()
