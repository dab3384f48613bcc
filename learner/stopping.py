"""When the learner stops training, and how it tells the producers: the step target, the compute budget, the drain.

Why its own module: deciding that training is over reads the run-wide stats every role adds to
(``protocol/compute.py``) and, under several ranks, needs a collective so that they all stop at the same
step; starting the drain writes the control flag actors and teachers watch. Neither is part of taking a
step, and keeping them here lets ``learner/loop.py`` read as the loop itself (and stay under the project's
module size). What the drain then does (train what is in flight until no actor is registered and the
ledger has nothing ``produced`` left) is ``learner/intake.py``'s ``collect(draining=True)``.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import redis

from learner.config import LearnerConfig
from learner.distributed import Distributed
from protocol import ledger
from protocol.compute import ComputeTally, format_flops
from protocol.names import Names

log = logging.getLogger(__name__)


class StoppingState(Protocol):
    """What deciding to stop reads of the learner (``learner.loop.Learner`` has it): the loop is never imported
    here, so the arrows point one way (loop -> phase) and this can be driven without a loop."""

    cfg: LearnerConfig
    step: int
    dist: Distributed
    client: redis.Redis
    names: Names

    def advertise(self, **measured: Any) -> None:
        """Publish the learner's state (``protocol/state.py``) with these measurements."""


def done_reason(learner: StoppingState) -> str | None:
    """Why training should stop now (`learner.steps` reached, or the run's FLOPs reached `learner.max_flops`), or None.

    The FLOPs are the run stats every role adds to (protocol/compute.py), so the budget covers generation and
    teacher scoring too (cache hits included under `learner.max_flops_charges_cache`); under several ranks they
    agree through a max, as they read Redis at different times.
    """
    cfg = learner.cfg
    if learner.step >= cfg.steps:
        return f"reached {cfg.steps} steps"
    if cfg.max_flops is None:
        return None
    spent = ComputeTally.from_stats(ledger.stats(learner.client, learner.names),
                                    charge_cache=cfg.max_flops_charges_cache).total
    over = spent >= cfg.max_flops
    if learner.dist.enabled:
        over = bool(learner.dist.max([float(over)])[0])
    if not over:
        return None
    return (f"spent the compute budget at step {learner.step} ({format_flops(spent)} of learner.max_flops="
            f"{format_flops(cfg.max_flops)})")


def start_draining(learner: StoppingState, reason: str) -> None:
    """Tell the producers to stop (rank 0 sets ``stop_producing``); what is in flight is still trained."""
    if learner.dist.is_main:
        learner.client.hset(learner.names.control, "stop_producing", "1")
    learner.advertise(phase="draining")
    log.info("%s: draining in-flight prefixes", reason)
