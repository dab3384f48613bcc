"""Distillation losses: one file per loss (its function, config variant and ``build()``), the union here.

``LossConfig`` is what ``learner.loss`` holds: a pydantic union discriminated by ``kind``. The learner
calls ``cfg.loss.build()`` once and then the built ``Loss`` per micro-batch; it never branches on a
loss name. Adding a loss is one new file in this package plus one member of ``LossConfig``
(docs/architecture.md, "Adding a component").

With raw HF logits (logits at ``t`` predict token ``t + 1``) the pure functions take views, not copies::

    loss = topk_kl_loss(logits_BTV[:, :-1], batch.topk_ids_BTK[:, 1:], batch.topk_logprobs_BTK[:, 1:],
                        batch.response_mask_BT[:, 1:], direction="forward")

which is what each built loss does for the learner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from learner.losses.gkd_jsd import GKDJSDConfig, gkd_jsd_loss
from learner.losses.sampled_reverse_kl import SampledReverseKLConfig, sampled_reverse_kl_loss
from learner.losses.topk_kl import TopKKLConfig, topk_kl_loss
from learner.losses.topk_sampled_tail import TopKSampledTailConfig, topk_sampled_tail_loss
from protocol.components import component_union

if TYPE_CHECKING:
    from learner.losses.common import (
        Loss,
        LossOutput,
        horizon_discount,
        opd_advantages,
        position_weights,
        token_weights,
    )
    from learner.losses.support import LOG_FLOOR

# The shared math needs torch; the config tree (and so `opd --help`) imports this package without it.
_LAZY = {name: "learner.losses.common" for name in
         ("Loss", "LossOutput", "horizon_discount", "opd_advantages", "position_weights", "token_weights")}
_LAZY["LOG_FLOOR"] = "learner.losses.support"


def __getattr__(name: str) -> Any:
    """The torch-backed names, imported on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


LossConfig = component_union(SampledReverseKLConfig, TopKKLConfig, GKDJSDConfig, TopKSampledTailConfig, default=TopKKLConfig,
                             kind_from_options=True)
"""``learner.loss``: one variant per loss, chosen by ``kind``. ``learner.loss: topk_kl`` (or ``--set
learner.loss=topk_kl``) means that loss with its defaults, and options without a kind belong to the loss that
has them all (``--set learner.loss.is_cap=3`` is ``sampled_reverse_kl``'s), else to the default loss
(``topk_kl``, as in learner/config.py), which then names the options it lacks."""

__all__ = [
    "LOG_FLOOR",
    "GKDJSDConfig",
    "Loss",
    "LossConfig",
    "LossOutput",
    "SampledReverseKLConfig",
    "TopKKLConfig",
    "TopKSampledTailConfig",
    "gkd_jsd_loss",
    "horizon_discount",
    "opd_advantages",
    "position_weights",
    "sampled_reverse_kl_loss",
    "token_weights",
    "topk_kl_loss",
    "topk_sampled_tail_loss",
]
