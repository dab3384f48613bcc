"""The learner's reverse KL by response position (learner/position_kl.py).

Pins:
- per token, behaviour minus teacher log-prob, averaged per bucket of positions (the last bucket also holds
  every later position), trained tokens and probe tokens apart, lists cut after the last bucket with a token;
- a window records how many samples it trained and their smallest and largest horizon;
- windows close every `window_steps` steps and the newest `history` are kept and published;
- several ranks: summing and maxing their `pending()` values gives the window one rank with all samples gives;
- a restarted learner takes back the windows published up to the step it resumed at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from learner.position_kl import PositionKL


@dataclass(frozen=True)
class Prefix:
    behaviour_logprobs_R: np.ndarray
    teacher_logprobs_R: np.ndarray
    horizon: int


def prefix(kl: list[float], horizon: int, behaviour: float = -1.0) -> Prefix:
    b = np.full(len(kl), behaviour, np.float32)
    return Prefix(b, b - np.asarray(kl, np.float32), horizon)


def tracker(**changes: int) -> PositionKL:
    return PositionKL(**{"bucket_tokens": 2, "buckets": 3, "window_steps": 1, "history": 3, **changes})


def test_means_per_bucket_trained_and_probes_apart() -> None:
    t = tracker()
    t.add_trained([prefix([1.0, 3.0, 5.0], horizon=3), prefix([3.0], horizon=4)])
    t.add_probe(prefix([0.5, 0.5, 1.0, 1.0, 2.0, 4.0, 6.0], horizon=8))
    w = t.close(1, *t.pending())
    assert w.kl_by_bucket == pytest.approx([7 / 3, 5.0]) and w.tokens_by_bucket == [3, 1]
    assert w.probe_kl_by_bucket == pytest.approx([0.5, 1.0, 4.0])  # the last bucket pools positions 4, 5 and 6
    assert w.probe_tokens_by_bucket == [2, 2, 3]
    assert (w.step, w.samples, w.horizon_min, w.horizon_max) == (1, 2, 3, 4)


def test_an_empty_window_and_empty_buckets() -> None:
    t = tracker()
    w = t.close(1, *t.pending())
    assert (w.samples, w.horizon_min, w.horizon_max, w.kl_by_bucket, w.probe_kl_by_bucket) == (0, 0, 0, [], [])
    t.add_probe(prefix([], horizon=8))
    t.add_trained([prefix([0.0, 0.0, 0.0, 0.0, 2.0], horizon=5)])
    w = t.close(2, *t.pending())
    assert w.kl_by_bucket == [0.0, 0.0, 2.0] and w.tokens_by_bucket == [2, 2, 1] and w.probe_tokens_by_bucket == []


def test_windows_close_every_few_steps_and_the_newest_are_kept() -> None:
    t = tracker(window_steps=2, history=2)
    assert [t.due(s) for s in range(1, 5)] == [False, True, False, True]
    for step in (2, 4, 6):
        t.add_trained([prefix([float(step)], horizon=1)])
        t.close(step, *t.pending())
    assert [w.step for w in t.windows] == [4, 6]
    published = t.published()
    assert published["kl_by_bucket"] == [6.0] and published["bucket_tokens"] == 2
    assert published["kl_windows"] == t.windows


def test_ranks_reduced_equal_one_rank_with_everything() -> None:
    samples = [prefix([0.5, 1.5, 2.5], 3), prefix([4.0], 7), prefix([1.0, 2.0, 3.0, 4.0, 5.0], 5)]
    probes = [prefix([0.25] * 6, 8), prefix([2.0] * 3, 8)]
    whole = tracker()
    whole.add_trained(samples)
    for p in probes:
        whole.add_probe(p)
    ranks = [tracker(), tracker(), tracker()]  # the third rank had nothing this window
    ranks[0].add_trained(samples[:1])
    ranks[0].add_probe(probes[0])
    ranks[1].add_trained(samples[1:])
    ranks[1].add_probe(probes[1])
    pend = [r.pending() for r in ranks]
    sums = [sum(v) for v in zip(*(p[0] for p in pend), strict=True)]
    maxima = [max(v) for v in zip(*(p[1] for p in pend), strict=True)]
    assert ranks[0].close(1, sums, maxima) == whole.close(1, *whole.pending())


def test_a_restarted_learner_takes_back_its_windows() -> None:
    before = tracker(history=4)
    for step in range(1, 5):
        before.add_trained([prefix([float(step)], horizon=2)])
        before.close(step, *before.pending())
    after = tracker(history=4)
    after.resume(before.windows, through_step=3)  # the last committed step the restart restored
    assert [w.step for w in after.windows] == [1, 2, 3]


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="bucket_tokens"):
        PositionKL(bucket_tokens=0, buckets=1, window_steps=1, history=1)
