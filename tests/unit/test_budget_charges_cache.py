"""The compute budget with the teacher cache charged (issue 17: "the cache confounds equal FLOPs").

A full cache hit forwards nothing, so its teacher FLOPs never reached the run stats' `flops_teacher`; rows
whose rollouts repeat got teacher scoring for free against an equal budget. Pins:
- `ComputeTally.from_stats(charge_cache=True)` counts the forwards the cache avoided (`flops_saved_cache`) as
  teacher compute; without it the tally is what was really computed (the default, unchanged);
- the learner's stop at `learner.max_flops` honours `learner.max_flops_charges_cache` (a real Redis holds
  the run stats): the same stats are over the budget charged and under it uncharged;
- the experiment charges every OPD row by default and leaves a `charge_cache: false` row (`random + cache`)
  uncharged, and the shipped config has such a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from learner.config import LearnerConfig
from learner.distributed import Distributed
from learner.stopping import done_reason
from protocol import ledger
from protocol.compute import FLOPS_SAVED_CACHE, FLOPS_TEACHER, ComputeTally
from protocol.names import Names

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stopping:
    """What `done_reason` reads of a learner (`learner.stopping.StoppingState`): the phase runs without a loop."""

    cfg: LearnerConfig
    step: int
    client: redis.Redis
    names: Names
    dist: Distributed

    def advertise(self, **measured: Any) -> None:
        """Nothing to publish here."""


def test_tally_charges_cache_hits_only_when_asked() -> None:
    stats = {FLOPS_TEACHER: 5.0, FLOPS_SAVED_CACHE: 3.0, "flops_generation": 1.0, "flops_learner": 2.0}
    assert ComputeTally.from_stats(stats).total == 8.0
    assert ComputeTally.from_stats(stats, charge_cache=True).teacher == 8.0
    assert ComputeTally.from_stats(stats, charge_cache=True).total == 11.0


@pytest.mark.parametrize("charged, stops", [(True, True), (False, False)])
def test_learner_budget_counts_cache_hits_when_charged(redis_url: str, charged: bool, stops: bool) -> None:
    client = redis.Redis.from_url(redis_url)
    names = Names("budget-test")
    ledger.add_stats(client, names, writer="test", seq=1, flops_generation=2e9, flops_teacher=4e9, flops_learner=3e9, flops_saved_cache=2e9)
    cfg = LearnerConfig(max_flops=1e10, max_flops_charges_cache=charged, steps=1000)
    reason = done_reason(Stopping(cfg=cfg, step=7, client=client, names=names, dist=Distributed()))
    assert (reason is not None) == stops
    if stops:
        assert "spent the compute budget at step 7 (11 GFLOP" in reason  # type: ignore[operator]


def test_experiment_charges_every_row_but_the_cache_row(tmp_path: Path) -> None:
    from opd.experiment.config import load_experiment
    from opd.experiment.runner import pipeline_config, plan

    cfg = load_experiment(REPO / "configs" / "experiment-truncation.yaml")
    pipes = {spec.row.name: pipeline_config(cfg, spec, vocab_size=64) for spec in plan(cfg, tmp_path)
             if spec.row.kind == "opd" and spec.seed == cfg.seeds[0]}
    assert pipes["random-cache"].learner.max_flops_charges_cache is False
    assert all(p.learner.max_flops_charges_cache for name, p in pipes.items() if name != "random-cache")
    assert pipes["random-cache"].actor.schedule == pipes["random"].actor.schedule
