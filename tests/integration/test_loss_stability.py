"""The default loss does not blow up where the old sampled estimator does (issue 9, docs/experiments.md).

On the shipped task models (models/task: the 1.06M teacher, the warmed-up 0.14M student), with the learner's
own optimizer step at its default learning rate (1e-3), 8 sequences per step and actors two versions behind
at most, seed 0, a few dozen steps: the old sampled estimator (no baseline, no advantage clip: Thinking
Machines Lab's OPD recipe) makes the student stop ending its answers (every rollout runs to the length limit)
and its exact KL to the teacher spike; the default loss (`opd up` with learner.loss unset: the top-k KL on
the default teacher.topk) keeps finishing answers and keeps the KL under a bound. Bounds, not timings, and
the same prompts and sampling seeds for both; the old estimator's failure is asserted too, so the test
shows the setting discriminates (were it not to fail, the bounds would prove nothing).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opd.experiment import loss_probe

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parents[2] / "models" / "task"
STEPS = 30
LAST = 10  # the window the end state is judged on
START_KL = 0.29  # nats per token: the shipped student's exact KL to the teacher on its own first batch
KL_BOUND = 2.0  # the default loss's worst step (an early Adam transient) measured 1.08; the old estimator's 3.4


@pytest.fixture(scope="module")
def env() -> loss_probe.Env:
    torch.set_num_threads(1)
    return loss_probe.Env(MODELS, eval_kl=0, eval_acc=0)


def _run(env: loss_probe.Env, name: str) -> list[dict[str, float]]:
    args = SimpleNamespace(steps=STEPS, lr=1e-3, batch=8, lag=2, eval_every=0)
    return [r for r in loss_probe.train_run(env, name, 0, args, log=lambda _m: None) if "train_kl_exact" in r]


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    last = rows[-LAST:]
    return {"finished_min": min(r["finished"] for r in rows),
            "finished_last": sum(r["finished"] for r in last) / len(last),
            "kl_max": max(r["train_kl_exact"] for r in rows),
            # the median: one batch of 8 can spike (measured 0.94 at step 25 among 0.09-0.42 around it), and a
            # mean over 10 steps let that one batch decide whether the student "learned something"
            "kl_last": statistics.median(r["train_kl_exact"] for r in last)}


def test_default_loss_stays_stable_where_the_old_sampled_estimator_blows_up(env: loss_probe.Env) -> None:
    default = _summary(_run(env, "default"))
    old = _summary(_run(env, "sampled-nobaseline"))
    report = f"default {default}, old sampled estimator {old}"
    assert default["finished_min"] >= 0.5 and default["finished_last"] >= 0.75, report  # it still ends answers
    assert default["kl_max"] <= KL_BOUND, report
    assert default["kl_last"] < START_KL, report  # and it learned something
    # the setting discriminates: the old estimator stops ending its answers (measured: every rollout of the
    # last 18 steps ran to the length limit) or its KL spikes past the bound
    assert old["finished_last"] <= 0.25 or old["kl_max"] > KL_BOUND, report
