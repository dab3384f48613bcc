"""Reverse KL by response position over windows of steps: what the learner measures for the adaptive schedule.

Measured from the messages alone, with no forward pass: per response token, `log mu(y) - log p_T(y)`
(behaviour minus teacher log-prob of the sampled token), the single-sample estimate of the reverse KL
KL(mu || p_T) that the sampled loss trains on and `opd_learner_reverse_kl` reports. Tokens are grouped in
buckets of `bucket_tokens` positions (the last bucket also holds every later position), separately for the
samples trained on and for the probes (full-length rollouts the learner measures and never trains on:
their positions past the horizon are the only view of the KL there).

Every `window_steps` steps the open window closes into a `KLWindow` (protocol/state.py); the newest
`history` windows are published in `LearnerState.kl_windows`. Windows, not the last step: one step's
per-bucket means are too noisy to detect settling, and a window is immutable once published, so every
actor reading the state decides from the same numbers. With several ranks each accumulates its own
samples and the window closes with one sum and one max over the ranks (`PositionKL.pending`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from protocol.state import KLWindow


class Measured(Protocol):
    """What a scored prefix offers the measurement (duck-typed, as `learner.batching.Sample.from_record`)."""

    behaviour_logprobs_R: np.ndarray
    teacher_logprobs_R: np.ndarray
    horizon: int


class PositionKL:
    """Accumulates one open window of per-bucket KL sums and keeps the newest closed windows."""

    def __init__(self, *, bucket_tokens: int, buckets: int, window_steps: int, history: int) -> None:
        if min(bucket_tokens, buckets, window_steps, history) < 1:
            raise ValueError(f"bucket_tokens, buckets, window_steps and history must be >= 1, got {bucket_tokens}, "
                             f"{buckets}, {window_steps}, {history}")
        self.bucket_tokens = bucket_tokens
        self.buckets = buckets
        self.window_steps = window_steps
        self.history = history
        self.windows: list[KLWindow] = []
        self._reset()

    def _reset(self) -> None:
        self._kl_B = np.zeros(self.buckets)
        self._tokens_B = np.zeros(self.buckets)
        self._probe_kl_B = np.zeros(self.buckets)
        self._probe_tokens_B = np.zeros(self.buckets)
        self._samples = 0
        self._probes = 0
        self._probes_finished = 0
        self._horizon_max = 0
        self._horizon_min = math.inf

    def _bucketed(self, message: Measured) -> tuple[np.ndarray, np.ndarray]:
        """(KL sum, token count) per bucket of one message's response tokens."""
        kl_R = np.asarray(message.behaviour_logprobs_R, np.float64) - np.asarray(message.teacher_logprobs_R, np.float64)
        bucket_R = np.minimum(np.arange(len(kl_R)) // self.bucket_tokens, self.buckets - 1)
        return (np.bincount(bucket_R, weights=kl_R, minlength=self.buckets),
                np.bincount(bucket_R, minlength=self.buckets).astype(np.float64))

    def add_trained(self, messages: Iterable[Measured]) -> None:
        for m in messages:
            kl_B, tokens_B = self._bucketed(m)
            self._kl_B += kl_B
            self._tokens_B += tokens_B
            self._samples += 1
            self._horizon_max = max(self._horizon_max, int(m.horizon))
            self._horizon_min = min(self._horizon_min, int(m.horizon))

    def add_probe(self, message: Measured) -> None:
        kl_B, tokens_B = self._bucketed(message)
        self._probe_kl_B += kl_B
        self._probe_tokens_B += tokens_B
        self._probes += 1
        self._probes_finished += bool(getattr(message, "finished", False))  # a scored prefix always carries it

    def due(self, step: int) -> bool:
        """Whether the window closes after `step` (the same answer on every rank)."""
        return step % self.window_steps == 0

    def pending(self) -> tuple[list[float], list[float]]:
        """This rank's open window as (values to sum over ranks, values to take the max of over ranks)."""
        sums = [*self._kl_B, *self._tokens_B, *self._probe_kl_B, *self._probe_tokens_B, float(self._samples),
                float(self._probes), float(self._probes_finished)]
        return [float(v) for v in sums], [float(self._horizon_max), -float(min(self._horizon_min, 2**31))]

    def close(self, step: int, sums: Sequence[float], maxima: Sequence[float]) -> KLWindow:
        """Close the open window from the reduced `pending()` values; keep the newest `history` windows."""
        b = self.buckets
        kl_B, tokens_B, probe_kl_B, probe_tokens_B = (np.asarray(sums[i * b:(i + 1) * b]) for i in range(4))
        samples = int(sums[4 * b])
        window = KLWindow(
            step=step, samples=samples, horizon_max=int(maxima[0]) if samples else 0,
            horizon_min=int(-maxima[1]) if samples else 0, probes=int(sums[4 * b + 1]),
            probes_finished=int(sums[4 * b + 2]),
            **_means("kl_by_bucket", "tokens_by_bucket", kl_B, tokens_B),
            **_means("probe_kl_by_bucket", "probe_tokens_by_bucket", probe_kl_B, probe_tokens_B),
        )
        self.windows = [*self.windows, window][-self.history:]
        self._reset()
        return window

    def resume(self, windows: Iterable[KLWindow], *, through_step: int) -> None:
        """Take back the windows a previous incarnation published (up to `through_step`, the restored step), so
        a restarted learner does not make the adaptive schedule start over."""
        self.windows = [w for w in windows if w.step <= through_step][-self.history:]

    def published(self) -> dict[str, object]:
        """The `LearnerState` fields: the newest window's trained KL per bucket, the bucket width, the windows."""
        newest = self.windows[-1].kl_by_bucket if self.windows else []
        return {"kl_by_bucket": list(newest), "bucket_tokens": self.bucket_tokens, "kl_windows": list(self.windows)}


def _means(kl_name: str, tokens_name: str, kl_sum_B: np.ndarray, tokens_B: np.ndarray) -> dict[str, list]:
    """Per-bucket means and counts, cut after the last bucket with a token (0.0 where a bucket is empty)."""
    filled = np.flatnonzero(tokens_B > 0)
    n = int(filled[-1]) + 1 if filled.size else 0
    means = [float(s / t) if t > 0 else 0.0 for s, t in zip(kl_sum_B[:n], tokens_B[:n], strict=True)]
    return {kl_name: means, tokens_name: [int(t) for t in tokens_B[:n]]}
