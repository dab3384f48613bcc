"""One optimizer step of the learner: token-budget micro-batches, gradient accumulation, the configured loss.

Why every rank runs the same number of micro-batches: the collectives inside the forward (FSDP) and the one
gradient all-reduce per step (DDP) must line up, so a rank with fewer pads with a zero-loss one. The loss is
normalised by all ranks' response tokens, so a step is the token mean over the global batch however the
samples are split. The loss is a component (``learner.loss``, one file each in ``learner/losses/``), built
once with ``cfg.loss.build()``. On CUDA the forward runs under bf16 autocast with the output head in float32
(``learner/precision.py``: the importance ratio compares with the actor's float32 log-probs).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from learner.batching import Batch, Sample, collate, pack_by_tokens
from learner.config import LearnerConfig
from learner.distributed import Distributed, TrainModel
from learner.losses import LossOutput, token_weights
from learner.precision import forward_autocast, fp32_output_head
from protocol.messages import ScoredPrefix
from protocol.telemetry import LearnerMetrics


@dataclass
class StepStats:
    """What one step did, summed or averaged over all ranks (the metrics, ``history.jsonl`` and the state).

    Two KLs, because only one of them is the truth. ``reverse_kl`` is the sampled-token estimate of the
    reverse KL on the training prefixes, the mean of ``log mu(y_t) - log p_T(y_t)`` over the student's own
    tokens: unbiased for KL(mu || p_T) whatever the loss, since the tokens were sampled from mu and the
    cache holds ``log p_T(y_t)`` exactly. ``support_kl`` is what the loss itself sees: the KL restricted to
    the teacher's top-k plus one tail bucket (``topk_kl``), a coarse-graining and so never above the true
    KL. On a real vocabulary it can be far below it: on SmolLM2's 49k tokens the student's own samples held
    most of its mass outside the teacher's top-8 and the bucket saw 0.33 nats of a true 6.99
    (docs/learner.md, "Which KL you are looking at"). Every view shows ``reverse_kl``.
    """

    loss: float
    reverse_kl: float  # sampled-token estimate of KL(mu || p_T) on the trained tokens (the true KL)
    support_kl: float  # the loss's restricted-support KL (top-k + bucket): a lower bound
    tokens: int
    samples: int = 0
    ratio_mean: float = 1.0
    ratio_max: float = 1.0
    clip_fraction: float = 0.0
    padding_fraction: float = 0.0
    seconds: float = 0.0
    sequence_tokens: int = 0  # prompt + response tokens forwarded and back-propagated (protocol/compute.py)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def export(self, metrics: LearnerMetrics, *, version: int, idle_fraction: float) -> None:
        """Set the step's Prometheus metrics."""
        metrics.steps.inc()
        metrics.loss.set(self.loss)
        metrics.reverse_kl.set(self.reverse_kl)
        metrics.support_kl.set(self.support_kl)
        metrics.tokens_trained.inc(self.tokens)
        metrics.tokens_per_second.set(self.tokens_per_second)
        metrics.policy_version.set(version)
        metrics.idle_fraction.set(idle_fraction)
        metrics.ratio_mean.set(self.ratio_mean)
        metrics.ratio_max.set(self.ratio_max)
        metrics.clip_fraction.set(self.clip_fraction)
        metrics.padding_fraction.set(self.padding_fraction)

    def history_row(self, *, step: int, version: int, waited_s: float, idle_fraction: float) -> dict[str, Any]:
        """The step's line of ``history.jsonl``."""
        return {"step": step, "version": version, "loss": self.loss, "reverse_kl": self.reverse_kl,
                "support_kl": self.support_kl, "tokens": self.tokens,
                "samples": self.samples, "seconds": self.seconds, "waited_s": waited_s,
                "tokens_per_second": self.tokens_per_second, "idle_fraction": idle_fraction,
                "ratio_mean": self.ratio_mean, "ratio_max": self.ratio_max, "clip_fraction": self.clip_fraction,
                "padding_fraction": self.padding_fraction, "time": time.time()}


@dataclass
class _Plan:
    """This rank's micro-batches, and the step's totals over all ranks."""

    samples: list[Sample]
    groups: list[list[int]]  # indices into samples, one list per micro-batch
    n_micro: int  # micro-batches every rank runs (the most any rank has)
    tokens: int  # response tokens: the loss normalizer
    samples_total: int
    sequence_tokens: int


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning rate's factor at optimizer step `step` (0-based): linear warm-up, `(step + 1) / warmup_steps`,
    then 1. The first step already trains (at lr / warmup_steps); transformers' `constant_with_warmup` starts at
    0 and wastes it, so the experiment's TRL baseline is given this one (opd/experiment/trl_baseline.py)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


class Trainer:
    """The model being trained, its optimizer and LR schedule, and the loss: `step` takes one optimizer step."""

    def __init__(self, cfg: LearnerConfig, train_model: TrainModel, dist: Distributed, device: torch.device,
                 pad_id: int) -> None:
        self.cfg = cfg
        self.train_model = train_model
        self.dist = dist
        self.device = device
        self.pad_id = pad_id
        self.loss = cfg.loss.build()
        vocab = int(getattr(train_model.module.config, "vocab_size", 0) or 0)
        self.micro_batch_tokens = micro_batch_budget(cfg.micro_batch_tokens, cfg.max_logits_mb, vocab)
        fp32_output_head(train_model.module)
        self.optimizer = torch.optim.AdamW(train_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_factor(s, warmup))

    def step(self, messages: list[ScoredPrefix]) -> StepStats:
        """One optimizer step on this rank's share (possibly empty when several ranks train)."""
        t0 = time.perf_counter()
        plan = self._plan(messages)
        # DDP and FSDP average gradients over ranks, hence the division by the world size.
        normalizer = max(plan.tokens, 1) / self.dist.world_size
        self.optimizer.zero_grad(set_to_none=True)
        acc = {"loss": 0.0, "kl": 0.0, "support": 0.0, "rmean": 0.0, "rmax": 0.0, "clip": 0.0, "pad": 0.0, "slots": 0.0}
        autocast = forward_autocast(self.device)
        for i in range(plan.n_micro):
            with self.train_model.grad_sync(i == plan.n_micro - 1):
                if i >= len(plan.groups):
                    self._empty_micro_batch(autocast)
                    continue
                batch = collate([plan.samples[j] for j in plan.groups[i]], self.pad_id).to(self.device)
                with autocast:
                    logits_BTV = self.train_model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
                out = self._loss(batch, logits_BTV, normalizer=normalizer)
                out.loss.backward()
            _accumulate(acc, out, batch)
        torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return self._stats(acc, plan, t0)

    def _plan(self, messages: list[ScoredPrefix]) -> _Plan:
        """Pack this rank's samples into micro-batches of at most `micro_batch_budget` tokens; agree on totals."""
        samples = [Sample.from_record(m) for m in messages]
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        groups = pack_by_tokens(lengths, self.micro_batch_tokens) if samples else []
        local_tokens = sum(len(s.response_ids) for s in samples)
        total_tokens, total_samples, n_micro = local_tokens, len(samples), len(groups)
        sequence_tokens = sum(lengths)
        if self.dist.enabled:
            total_tokens, total_samples, sequence_tokens = (
                int(v) for v in self.dist.sum([local_tokens, len(samples), sequence_tokens]))
            n_micro = int(self.dist.max([len(groups)])[0])
        return _Plan(samples, groups, n_micro, total_tokens, total_samples, sequence_tokens)

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

    def _stats(self, acc: dict[str, float], plan: _Plan, t0: float) -> StepStats:
        """The step's statistics over all ranks (token-weighted means, the max of the ratio maxima)."""
        if self.dist.enabled:
            keys = ("loss", "kl", "support", "rmean", "clip", "pad", "slots")
            for key, value in zip(keys, self.dist.sum([acc[k] for k in keys]), strict=True):
                acc[key] = value
            acc["loss"] /= self.dist.world_size
            acc["rmax"] = self.dist.max([acc["rmax"]])[0]
        denom = max(plan.tokens, 1)
        return StepStats(
            loss=acc["loss"], reverse_kl=acc["kl"] / denom, support_kl=acc["support"] / denom, tokens=plan.tokens, samples=plan.samples_total,
            ratio_mean=acc["rmean"] / denom if acc["rmean"] else 1.0, ratio_max=acc["rmax"] or 1.0,
            clip_fraction=acc["clip"] / denom, padding_fraction=acc["pad"] / max(acc["slots"], 1),
            seconds=time.perf_counter() - t0, sequence_tokens=plan.sequence_tokens,
        )


LOGITS_COPIES = 4  # fp32 tokens x vocab tensors alive at the peak: logits, log-softmax, and their gradients


def micro_batch_budget(micro_batch_tokens: int, max_logits_mb: int, vocab_size: int) -> int:
    """Tokens per micro-batch: `learner.micro_batch_tokens`, cut so the vocabulary-sized tensors fit in
    `learner.max_logits_mb`. WHY: at a real vocabulary the logits, not the model, dominate the learner's
    memory (4,096 tokens x 49,152 x 4 bytes is 805 MB per copy, and the forward and backward hold several);
    a token budget that ignores the vocabulary is an out-of-memory waiting for a long batch. Never below
    16 tokens (a single longer sequence still gets a micro-batch of its own, as `pack_by_tokens` does)."""
    if vocab_size <= 0:
        return micro_batch_tokens
    fits = (max_logits_mb << 20) // (vocab_size * 4 * LOGITS_COPIES)
    return max(16, min(micro_batch_tokens, fits))


def sampled_kl_sum(batch: Batch) -> torch.Tensor:
    """Sum over the response tokens of ``log mu(y_t) - log p_T(y_t)``: the sampled reverse-KL estimate's
    numerator (see `StepStats`), from the behaviour and teacher logprobs every message carries."""
    diff_BT = torch.where(batch.response_mask_BT, batch.behaviour_logprobs_BT - batch.teacher_logprobs_BT, 0.0)
    return diff_BT.sum()


def _accumulate(acc: dict[str, float], out: LossOutput, batch: Batch) -> None:
    """Add one micro-batch's loss output to the step's sums (token-weighted, so ranks and micro-batches combine)."""
    n = float(out.tokens)
    acc["loss"] += float(out.loss.detach())
    acc["kl"] += float(sampled_kl_sum(batch))
    acc["support"] += float(out.reverse_kl) * n
    if out.ratio_mean is not None:
        acc["rmean"] += float(out.ratio_mean) * n
        acc["rmax"] = max(acc["rmax"], float(out.ratio_max))
        acc["clip"] += float(out.clip_fraction) * n
    slots = batch.attention_mask_BT.numel()
    acc["pad"] += batch.padding_fraction * slots
    acc["slots"] += slots
