"""The adaptive schedule (actors/schedules/adaptive.py) on recorded KL traces, through the real measurement path.

Every trace goes through what a run uses: synthetic scored prefixes (their per-token reverse KL given by the
trace) into the learner's `PositionKL`, its windows into a `LearnerState`, encoded and decoded as actors read
it, and the schedule deciding from that. In the closed-loop traces the horizon the schedule picks decides
which positions the synthetic student trains, with the actors `LAG` steps behind the learner.

Pins:
- a settling trace grows the horizon, step by step, up to its bound; a still-improving one does not grow;
- the probes veto growth where the KL past the horizon is low next to the KL within it, and do not without
  enough probe tokens;
- windows that mix horizons (samples still in flight from before a growth) do not count;
- bounds hold ([start_tokens, max_tokens]); the horizon never shrinks, including while samples at the old
  horizon are in flight; two actors handed the same state agree, and the rng is not drawn from;
- bad options fail at load naming the key, and `learner.kl_history` must hold the windows the schedule needs;
- the end-of-answer guard: the probes' EOS rate falling across a window grows the horizon even while the KL
  still improves, and only with enough probes; their counts reach the published state.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from actors.config import ActorConfig
from actors.schedules.adaptive import AdaptiveSchedule
from learner.position_kl import PositionKL
from opd.config import ConfigError, load_config
from protocol.state import KLWindow, LearnerState, decode_state, encode_state

MAX_NEW = 64
BUCKET = 8
WINDOW_STEPS = 2
HISTORY = 12
LAG = 3  # steps between an actor reading the state and the learner training what it sampled


@dataclass(frozen=True)
class Prefix:
    """What the learner measures of a scored prefix: behaviour - teacher log-prob is the per-token KL."""

    behaviour_logprobs_R: np.ndarray
    teacher_logprobs_R: np.ndarray
    horizon: int


def prefix(kl_R: np.ndarray, horizon: int) -> Prefix:
    return Prefix(np.zeros(len(kl_R)), -np.asarray(kl_R, dtype=np.float64), horizon)


def build(**options: Any) -> AdaptiveSchedule:
    cfg = ActorConfig.model_validate({"schedule": {"kind": "adaptive", **options}, "max_new_tokens": MAX_NEW})
    return cfg.schedule.build(MAX_NEW)  # type: ignore[return-value]


def as_read_by_an_actor(tracker: PositionKL, step: int) -> LearnerState:
    state = LearnerState(version=step, step=step, batch_size=8, max_staleness=LAG, **tracker.published())  # type: ignore[arg-type]
    decoded = decode_state(encode_state(state))
    assert isinstance(decoded, LearnerState)
    return decoded


KLTrace = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (positions, exposure of each position) -> KL


def closed_loop(schedule: AdaptiveSchedule, trace: KLTrace, *, steps: int, probes: bool = True,
                batch: int = 8, answer_tokens: int = MAX_NEW) -> list[int]:
    """Run a synthetic student for `steps` learner steps; returns the horizon each step's samples were cut at.

    Each position's exposure counts the steps it was trained; a step trains `batch` prefixes cut at the horizon
    the actors picked `LAG` steps earlier (from the state published then); one full-length probe per step.
    """
    tracker = PositionKL(bucket_tokens=BUCKET, buckets=MAX_NEW // BUCKET, window_steps=WINDOW_STEPS, history=HISTORY)
    exposure = np.zeros(MAX_NEW)
    positions = np.arange(MAX_NEW)
    in_flight: deque[int] = deque()
    trained_at: list[int] = []
    for step in range(1, steps + 1):
        in_flight.append(schedule.horizon(as_read_by_an_actor(tracker, step - 1), random.Random(0)))
        horizon = in_flight.popleft() if len(in_flight) > LAG else schedule.start_tokens
        kl = trace(positions, exposure)
        length = min(horizon, answer_tokens)
        tracker.add_trained(prefix(kl[:length], horizon) for _ in range(batch))
        if probes:
            tracker.add_probe(prefix(kl[:answer_tokens], MAX_NEW))
        exposure[:length] += 1
        trained_at.append(horizon)
        if tracker.due(step):
            tracker.close(step, *tracker.pending())
    return trained_at


def settling(positions: np.ndarray, exposure: np.ndarray) -> np.ndarray:
    """Each position's KL falls from 2.2 to a floor of 0.2 within ~15 steps of training on it."""
    return 0.2 + 2.0 * np.exp(-exposure / 5.0)


def still_improving(positions: np.ndarray, exposure: np.ndarray) -> np.ndarray:
    """Each position's KL keeps falling by 3% per step of training: never settles within a run."""
    return 2.0 * 0.97**exposure


def easy_past(tokens: int) -> KLTrace:
    """Settling, but the student already matches the teacher from position `tokens` on (no signal there)."""
    def trace(positions: np.ndarray, exposure: np.ndarray) -> np.ndarray:
        return np.where(positions >= tokens, 0.005, settling(positions, exposure))
    return trace


def test_a_settling_trace_grows_the_horizon_to_its_bound() -> None:
    schedule = build(start_tokens=8, step_tokens=8)
    horizons = closed_loop(schedule, settling, steps=400)
    assert horizons[0] == 8 and horizons[-1] == MAX_NEW
    assert sorted(set(horizons)) == list(range(8, MAX_NEW + 1, 8))  # one step at a time, no jumps
    assert all(b >= a for a, b in itertools.pairwise(horizons))  # never shrinks, lag included


def test_a_still_improving_trace_does_not_grow() -> None:
    schedule = build(start_tokens=8, step_tokens=8)
    assert set(closed_loop(schedule, still_improving, steps=200)) == {8}


def test_probes_veto_growth_where_the_late_kl_carries_no_signal() -> None:
    schedule = build(start_tokens=8, step_tokens=8, min_probe_tokens=16)
    assert closed_loop(schedule, easy_past(24), steps=400)[-1] == 24  # holds where the probes see no signal
    assert closed_loop(schedule, easy_past(24), steps=400, probes=False)[-1] == MAX_NEW  # no evidence, no veto
    assert closed_loop(build(start_tokens=8, step_tokens=8, late_kl_ratio=0), easy_past(24), steps=400)[-1] == MAX_NEW


def test_answers_ending_before_the_horizon_do_not_veto() -> None:
    """Rollouts that stop at EOS before the horizon leave no probe tokens past it: settling alone decides."""
    schedule = build(start_tokens=8, step_tokens=8)
    assert closed_loop(schedule, settling, steps=400, answer_tokens=20)[-1] == MAX_NEW


def test_bounds_hold() -> None:
    schedule = build(start_tokens=16, step_tokens=40, max_tokens=48)
    horizons = closed_loop(schedule, settling, steps=300)
    assert min(horizons) == 16 and max(horizons) == 48
    assert build(start_tokens=16).horizon(LearnerState.assumed(99), random.Random(0)) == 16  # no learner: start


def _window(step: int, kl: float, horizon_min: int, horizon_max: int) -> KLWindow:
    return KLWindow(step=step, samples=8, horizon_min=horizon_min, horizon_max=horizon_max, kl_by_bucket=[kl],
                    tokens_by_bucket=[64])


def test_windows_that_mix_horizons_do_not_count() -> None:
    schedule = build(start_tokens=8, step_tokens=8, window=2)
    flat_at_8 = [_window(2, 1.0, 8, 8), _window(4, 1.0, 8, 8)]
    assert schedule.decide(flat_at_8, BUCKET) == 16
    mixed = [*flat_at_8, _window(6, 2.0, 8, 16), _window(8, 2.0, 8, 16)]
    assert schedule.decide(mixed, BUCKET) == 16  # still growing to 16, not beyond: nothing settled at 16 yet
    settled_at_16 = [*mixed, _window(10, 1.5, 16, 16), _window(12, 1.5, 16, 16)]
    assert schedule.decide(settled_at_16, BUCKET) == 24
    assert schedule.decide([_window(2, 2.0, 8, 8), _window(4, 1.0, 8, 8)], BUCKET) == 8  # halved: still improving


def test_actors_handed_the_same_state_agree_without_drawing_from_the_rng() -> None:
    tracker = PositionKL(bucket_tokens=BUCKET, buckets=8, window_steps=1, history=HISTORY)
    for step in range(1, 7):
        tracker.add_trained([prefix(np.full(8, 0.5), 8)] * 4)
        tracker.close(step, *tracker.pending())
    state = as_read_by_an_actor(tracker, 6)
    rngs = [random.Random(1), random.Random(2)]
    picks = {build(start_tokens=8, step_tokens=8).horizon(state, rng) for rng in rngs}
    assert picks == {16}
    assert [r.random() for r in rngs] == [random.Random(1).random(), random.Random(2).random()]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["actor.schedule.start_tokens=65", "actor.max_new_tokens=64"], "actor.schedule.start_tokens"),
        (["actor.schedule.max_tokens=65", "actor.max_new_tokens=64"], "actor.schedule.max_tokens"),
        (["actor.schedule.max_tokens=8", "actor.schedule.start_tokens=16"], "actor.schedule.max_tokens"),
        (["actor.schedule.window=1"], "actor.schedule.window"),
        (["actor.schedule.settle_threshold=0"], "actor.schedule.settle_threshold"),
        (["actor.schedule.step_tokens=0"], "actor.schedule.step_tokens"),
    ],
)
def test_bad_options_fail_at_load_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^  {key}:"):
        load_config(None, ["actor.schedule.kind=adaptive", *overrides])


def test_the_learner_must_keep_the_windows_the_schedule_needs() -> None:
    """A qualifying run must stay published until samples at the grown horizon reach the learner."""
    cfg = ActorConfig.model_validate({"schedule": {"kind": "adaptive", "window": 4}}).schedule
    assert cfg.learner_windows_needed(max_staleness=4, window_steps=4) == 4 + math.ceil(5 / 4) + 1  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"learner\.kl_history=6 keeps fewer KL windows"):
        load_config(None, ["actor.schedule.kind=adaptive", "learner.kl_history=6", "learner.max_staleness=4",
                           "learner.kl_window_steps=4"])
    load_config(None, ["actor.schedule.kind=adaptive", "learner.kl_history=7", "learner.max_staleness=4",
                       "learner.kl_window_steps=4"])


def _probed(step: int, kl: float, probes: int, finished: int, horizon: int = 8) -> KLWindow:
    return KLWindow(step=step, samples=8, horizon_min=horizon, horizon_max=horizon, kl_by_bucket=[kl],
                    tokens_by_bucket=[64], probes=probes, probes_finished=finished)


def test_end_of_answer_guard_grows_when_the_probes_stop_finishing() -> None:
    """Issue 17: the adaptive schedule collapsed (0% exact match) in one seed: answers stopped ending while the KL
    on the horizon still improved, so it never grew. The probes' EOS rate falling now grows it; fails on main,
    where these windows (KL halving: not settled) hold the horizon at 8."""
    schedule = build(start_tokens=8, step_tokens=8, window=4)
    improving = [2.0, 2.0, 1.0, 1.0]  # not settled: the KL detector alone holds the horizon
    falling = [_probed(2 * i + 2, kl, 10, f) for i, (kl, f) in enumerate(zip(improving, (9, 9, 5, 4), strict=True))]
    assert schedule.decide(falling, BUCKET) == 16
    steady = [_probed(2 * i + 2, kl, 10, 9) for i, kl in enumerate(improving)]
    assert schedule.decide(steady, BUCKET) == 8
    few = [_probed(2 * i + 2, kl, 3, f) for i, (kl, f) in enumerate(zip(improving, (3, 3, 0, 0), strict=True))]
    assert schedule.decide(few, BUCKET) == 8  # 6 probes a half: below min_guard_probes, no evidence
    assert build(start_tokens=8, step_tokens=8, window=4, finish_drop=None).decide(falling, BUCKET) == 8
    assert schedule.decide(falling[-3:], BUCKET) == 8  # fewer windows at the horizon than `window`: no verdict


def test_probes_finish_rate_reaches_the_state() -> None:
    """Through the real measurement path: probes' EOS counts go into the window, sum over ranks, survive encoding."""
    @dataclass(frozen=True)
    class Probe:
        behaviour_logprobs_R: np.ndarray
        teacher_logprobs_R: np.ndarray
        horizon: int
        finished: bool

    tracker = PositionKL(bucket_tokens=BUCKET, buckets=8, window_steps=1, history=4)
    tracker.add_trained([Probe(np.zeros(2), np.full(2, -1.0), 8, False)])
    for finished in (True, True, False):
        tracker.add_probe(Probe(np.zeros(4), np.full(4, -1.0), MAX_NEW, finished))
    window = tracker.close(1, *tracker.pending())
    assert (window.probes, window.probes_finished) == (3, 2)
    assert as_read_by_an_actor(tracker, 1).kl_windows[0].probes_finished == 2
