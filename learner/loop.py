"""The learner: pull scored prefixes, drop the stale, train, publish weights, checkpoint, evaluate.

Read top to bottom: `Learner.__init__` (model, optimizer, resume), `next_batch` (staleness filter,
idle time), `train_step` (token-budget micro-batches, gradient accumulation), `run` (the loop and the
drain at the end). Samples are acknowledged after the optimizer step that used them, in the same
transaction that records their outcome in the ledger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from learner import losses
from learner.batching import Sample, collate, gather_response_logprobs, pack_by_tokens
from learner.checkpoint import latest_checkpoint, load_checkpoint, publish_weights, save_checkpoint
from learner.config import LearnerConfig
from learner.staleness import split_by_staleness
from protocol import ledger
from protocol.config import TransportConfig
from protocol.messages import ScoredPrefix, WeightsAnnouncement
from protocol.names import Names
from protocol.runtime import StopFlag, announce_weights, register_endpoint, resolve_device
from protocol.streams import Delivery, StreamQueue, connect
from protocol.telemetry import LearnerMetrics, MetricsServer, learner_metrics

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    loss: float
    reverse_kl: float
    tokens: int
    ratio_mean: float = 1.0
    ratio_max: float = 1.0
    clip_fraction: float = 0.0
    padding_fraction: float = 0.0
    seconds: float = 0.0


@dataclass
class LearnerSummary:
    steps: int = 0
    trained: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    evals: list[dict[str, float]] = field(default_factory=list)


class Prefetcher:
    """Reads the next deliveries on a thread while the current step trains (I/O overlaps compute).

    The buffer hands out the oldest policy version first: replicas finish out of order, and training
    the oldest samples first keeps them inside the staleness bound.
    """

    def __init__(self, q: StreamQueue, batch_size: int, stop: StopFlag) -> None:
        self.q = q
        self.buffer: queue.PriorityQueue[tuple[int, int, Delivery]] = queue.PriorityQueue(maxsize=2 * batch_size)
        self._seq = 0
        self.batch_size = batch_size
        self.stop = stop
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self._halt.is_set() and not self.stop.is_set():
                room = self.buffer.maxsize - self.buffer.qsize()
                if room <= 0:
                    time.sleep(0.005)
                    continue
                for d in self.q.read(min(room, self.batch_size), block_ms=200):
                    self._seq += 1
                    self.buffer.put((d.message.policy_version, self._seq, d))  # type: ignore[union-attr]
        except BaseException as exc:  # surfaced in the main thread
            self.error = exc

    def get(self, timeout: float) -> Delivery | None:
        if self.error is not None:
            raise RuntimeError(f"reading {self.q.stream} failed: {self.error}") from self.error
        try:
            return self.buffer.get(timeout=timeout)[2]
        except queue.Empty:
            return None

    def close(self) -> None:
        self._halt.set()
        self.thread.join(timeout=5)


class Learner:
    def __init__(self, cfg: LearnerConfig, transport: TransportConfig, *, learner_id: str = "learner",
                 stop: StopFlag | None = None, registry: CollectorRegistry | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not transport.redis_url:
            raise ValueError("transport.redis_url is required to run the learner")
        self.cfg = cfg
        self.learner_id = learner_id
        self.stop = stop or StopFlag()
        self.device = torch.device(resolve_device(cfg.device))
        torch.manual_seed(cfg.seed)
        self.names = Names(transport.namespace)
        self.client = connect(transport.redis_url)
        self.registry = registry or CollectorRegistry()
        self.metrics: LearnerMetrics = learner_metrics(self.registry)
        self.queue = StreamQueue(
            self.client, self.names.scored, names=self.names, consumer=learner_id, expect=ScoredPrefix,
            max_deliveries=transport.max_deliveries, claim_idle_ms=transport.claim_idle_ms,
            max_bytes=transport.max_message_bytes,
            on_dead_letter=lambda d: self.metrics.dead_letters.labels(stream=d.stream, reason=d.reason.split(":")[0]).inc(),
        )
        self.workdir = Path(cfg.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
        self.pad_id = _pad_id(self.tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, torch_dtype=torch.float32).to(self.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.step = 0
        self.version = 0
        ckpt = latest_checkpoint(self.workdir / "checkpoints")
        if ckpt is not None:
            meta = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
            self.step, self.version = int(meta["step"]), int(meta["policy_version"])
            log.info("resumed from %s at step %d, policy v%d", ckpt, self.step, self.version)
        self.summary = LearnerSummary()
        self.publish()
        self.advertise()  # early: actors wait for this before producing (admission control)
        self.evaluator = _Evaluator.maybe(cfg, self.tokenizer, self.device)

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
            split = split_by_staleness([d.message], learner_version=self.version, max_staleness=self.cfg.max_staleness)
            lag = self.version - d.message.policy_version
            self.metrics.staleness.observe(max(lag, 0))
            if split.kept:
                kept.append(d)
            else:
                reason = split.dropped[0].reason
                log.debug("dropped %s: v%d at learner v%d (%s)", d.message.id, d.message.policy_version, self.version, reason)
                self.queue.ack([d.entry_id], ledger={d.message.id: ledger.DROPPED})
                self.metrics.dropped.labels(reason=reason).inc()
                self.summary.dropped[reason] = self.summary.dropped.get(reason, 0) + 1
        return kept, waited

    # -- math ----------------------------------------------------------------------------------
    def train_step(self, messages: list[ScoredPrefix]) -> StepStats:
        t0 = time.perf_counter()
        cfg = self.cfg
        samples = [Sample.from_record(m) for m in messages]
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        groups = pack_by_tokens(lengths, cfg.micro_batch_tokens)
        total_tokens = sum(len(s.response_ids) for s in samples)
        self.optimizer.zero_grad(set_to_none=True)
        acc = {"loss": 0.0, "kl": 0.0, "rmean": 0.0, "rmax": 0.0, "clip": 0.0, "pad": 0.0, "slots": 0}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        for group in groups:
            batch = collate([samples[i] for i in group], self.pad_id).to(self.device)
            with autocast:
                logits_BTV = self.model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
            out = self._loss(batch, logits_BTV, normalizer=float(total_tokens))
            out.loss.backward()
            n = float(out.tokens)
            acc["loss"] += float(out.loss)
            acc["kl"] += float(out.reverse_kl) * n
            if out.ratio_mean is not None:
                acc["rmean"] += float(out.ratio_mean) * n
                acc["rmax"] = max(acc["rmax"], float(out.ratio_max))
                acc["clip"] += float(out.clip_fraction) * n
            slots = batch.attention_mask_BT.numel()
            acc["pad"] += batch.padding_fraction * slots
            acc["slots"] += slots
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.version += 1
        denom = max(total_tokens, 1)
        return StepStats(
            loss=acc["loss"], reverse_kl=acc["kl"] / denom, tokens=total_tokens,
            ratio_mean=acc["rmean"] / denom if acc["rmean"] else 1.0, ratio_max=acc["rmax"] or 1.0,
            clip_fraction=acc["clip"] / denom, padding_fraction=acc["pad"] / max(acc["slots"], 1),
            seconds=time.perf_counter() - t0,
        )

    def _loss(self, batch, logits_BTV: torch.Tensor, *, normalizer: float) -> losses.LossOutput:  # type: ignore[no-untyped-def]
        cfg = self.cfg
        mask_BT = batch.response_mask_BT
        weights_BT = None
        if cfg.position_gamma > 0:
            adv = losses.opd_advantages(batch.behaviour_logprobs_BT, batch.teacher_logprobs_BT)
            weights_BT = losses.position_weights(adv, mask_BT, gamma=cfg.position_gamma)
        if cfg.horizon_discount < 1.0:
            disc = losses.horizon_discount(mask_BT, discount=cfg.horizon_discount)
            weights_BT = disc if weights_BT is None else weights_BT * disc
        if cfg.loss == "sampled_reverse_kl":
            logprobs_BT = gather_response_logprobs(logits_BTV, batch.input_ids_BT)
            return losses.sampled_reverse_kl_loss(
                logprobs_BT, batch.behaviour_logprobs_BT, batch.teacher_logprobs_BT, mask_BT,
                is_cap=cfg.is_cap, weights_BT=weights_BT, normalizer=normalizer,
            )
        w = weights_BT[:, 1:] if weights_BT is not None else None
        args = (logits_BTV[:, :-1], batch.topk_ids_BTK[:, 1:], batch.topk_logprobs_BTK[:, 1:], mask_BT[:, 1:])
        if batch.topk_ids_BTK.shape[-1] == 0:
            raise ValueError(f"learner.loss={cfg.loss} needs teacher top-k: set teacher.topk > 0")
        if cfg.loss == "topk_kl":
            return losses.topk_kl_loss(*args, direction=cfg.topk_direction, tail=cfg.topk_tail,
                                       weights_BT=w, normalizer=normalizer)
        return losses.gkd_jsd_loss(*args, beta=cfg.gkd_beta, tail=cfg.topk_tail, weights_BT=w, normalizer=normalizer)

    # -- side effects ----------------------------------------------------------------------------
    def advertise(self, **extra: float | str) -> None:
        """Learner state in Redis: actors' admission control and `opd top` read it."""
        self.client.hset(self.names.learner_state, mapping={
            "version": self.version, "step": self.step, "batch_size": self.cfg.batch_size,
            "max_staleness": self.cfg.max_staleness, **{k: str(v) for k, v in extra.items()},
        })

    def publish(self) -> None:
        t0 = time.perf_counter()
        path, nbytes = publish_weights(self.model, self.workdir / "weights", self.version, self.cfg.keep_published,
                                       tokenizer=self.tokenizer)
        announce_weights(self.client, self.names, WeightsAnnouncement(
            version=self.version, path=str(Path(path).resolve()), step=self.step, nbytes=nbytes))
        dt = time.perf_counter() - t0
        self.metrics.publish_seconds.set(dt)
        self.metrics.publish_bytes.inc(nbytes)
        self.metrics.policy_version.set(self.version)

    def checkpoint(self) -> None:
        save_checkpoint(self.workdir / "checkpoints", self.model, self.optimizer, self.scheduler,
                        policy_version=self.version, step=self.step, keep_last=self.cfg.keep_checkpoints,
                        extra={"stream": self.names.scored, "group": self.queue.group})

    def evaluate(self) -> None:
        if self.evaluator is None:
            return
        result = self.evaluator.run(self.model)
        row = {"step": self.step, "version": self.version, "reverse_kl": result.reverse_kl,
               "tokens": result.tokens, "mean_response_len": result.mean_response_len, "time": time.time()}
        self.summary.evals.append(row)
        with open(self.workdir / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.metrics.eval_reverse_kl.set(result.reverse_kl)
        first = self.summary.evals[0]["reverse_kl"]
        self.advertise(eval_kl_first=first, eval_kl_last=result.reverse_kl)
        log.info("eval at step %d: held-out reverse KL %.4f (%d tokens)", self.step, result.reverse_kl, result.tokens)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> LearnerSummary:
        cfg = self.cfg
        self.evaluate()
        prefetch = Prefetcher(self.queue, cfg.batch_size, self.stop)
        history = open(self.workdir / "history.jsonl", "a")  # noqa: SIM115 (closed below)
        wall0, idle = time.perf_counter(), 0.0
        draining = False
        try:
            while not self.stop.is_set():
                if self.step >= cfg.steps and not draining:
                    if not cfg.drain:
                        break
                    draining = True
                    self.client.hset(self.names.control, "stop_producing", "1")
                    log.info("reached %d steps: draining in-flight prefixes", cfg.steps)
                deadline = 2.0 if draining else cfg.read_timeout_s
                batch, waited = self.next_batch(prefetch, cfg.batch_size, deadline_s=deadline)
                idle += waited
                if not batch:
                    if draining and self._drained():
                        break
                    if not draining and not self.stop.is_set():
                        raise TimeoutError(f"no scored prefixes for {cfg.read_timeout_s:.0f}s: are teachers and actors running?")
                    continue
                stats = self.train_step([d.message for d in batch])  # type: ignore[misc]
                self.queue.ack([d.entry_id for d in batch], ledger={d.message.id: ledger.TRAINED for d in batch})
                self.summary.steps += 1
                self.summary.trained += len(batch)
                if self.step % cfg.publish_every == 0:
                    self.publish()  # before advertising the new version, so admitted work samples it
                self._record(stats, history, idle / max(time.perf_counter() - wall0, 1e-9))
                if self.step % cfg.checkpoint_every == 0:
                    self.checkpoint()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
        finally:
            prefetch.close()
            history.close()
        self.checkpoint()
        self.publish()
        if not cfg.eval.every or self.step % cfg.eval.every != 0:
            self.evaluate()
        self.advertise(phase="done")
        log.info("learner done: %d steps, %d samples trained, dropped %s", self.step, self.summary.trained,
                 self.summary.dropped or "none")
        return self.summary

    def _drained(self) -> bool:
        """Nothing in flight and no actor still producing: the run's books are closed."""
        return int(self.client.scard(self.names.key("actors"))) == 0 and ledger.counts(self.client, self.names)[ledger.PRODUCED] == 0

    def _record(self, s: StepStats, history, idle_fraction: float) -> None:  # type: ignore[no-untyped-def]
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
        row = {"step": self.step, "version": self.version, "loss": s.loss, "reverse_kl": s.reverse_kl, "tokens": s.tokens,
               "tokens_per_second": tps, "idle_fraction": idle_fraction, "ratio_mean": s.ratio_mean,
               "ratio_max": s.ratio_max, "clip_fraction": s.clip_fraction, "padding_fraction": s.padding_fraction,
               "time": time.time()}
        history.write(json.dumps(row) + "\n")
        history.flush()
        self.advertise(loss=f"{s.loss:.5f}", reverse_kl=f"{s.reverse_kl:.5f}", tokens_per_second=f"{tps:.0f}",
                       idle_fraction=f"{idle_fraction:.3f}")


class _Evaluator:
    """Held-out reverse KL with the teacher loaded once (only when evaluation is configured)."""

    def __init__(self, cfg: LearnerConfig, tokenizer, device: torch.device) -> None:  # type: ignore[no-untyped-def]
        from transformers import AutoModelForCausalLM

        from learner.evaluate import load_heldout

        self.cfg = cfg
        self.teacher = AutoModelForCausalLM.from_pretrained(cfg.eval.teacher_dir, torch_dtype=torch.float32).to(device)
        self.teacher.eval()
        self.prompts = load_heldout(cfg.eval.heldout_file, tokenizer, cfg.eval.num_prompts)
        self.pad_id = _pad_id(tokenizer)
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def maybe(cls, cfg: LearnerConfig, tokenizer, device: torch.device) -> _Evaluator | None:  # type: ignore[no-untyped-def]
        if not cfg.eval.heldout_file:
            return None
        if not cfg.eval.teacher_dir:
            raise ValueError("learner.eval.teacher_dir is required when learner.eval.heldout_file is set")
        return cls(cfg, tokenizer, device)

    def run(self, model: torch.nn.Module):  # type: ignore[no-untyped-def]
        from learner.evaluate import heldout_reverse_kl

        return heldout_reverse_kl(model, self.teacher, self.prompts, max_new_tokens=self.cfg.eval.max_new_tokens,
                                  pad_id=self.pad_id, eos_id=self.eos_id, seed=self.cfg.seed + 1234)


def _pad_id(tokenizer) -> int:  # type: ignore[no-untyped-def]
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def run_learner(cfg: LearnerConfig, transport: TransportConfig, *, learner_id: str = "learner",
                stop: StopFlag | None = None) -> LearnerSummary:
    """Entry point of `opd learner`."""
    learner = Learner(cfg, transport, learner_id=learner_id, stop=stop)
    server = MetricsServer(learner.registry, host=cfg.metrics_host, port=cfg.metrics_port)
    register_endpoint(learner.client, learner.names, learner_id, server.url)
    log.info("%s: metrics at %s, device %s", learner_id, server.url, learner.device)
    try:
        return learner.run()
    finally:
        server.close()
