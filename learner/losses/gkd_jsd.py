"""GKD's generalized Jensen-Shannon divergence on the teacher's top-k support.

One component: the loss function, its config variant (``learner.loss.kind: gkd_jsd``) and ``build()``.
Needs ``teacher.topk > 0`` (checked when the config is loaded).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from learner.batching import Batch
    from learner.losses.common import LossOutput
    from learner.losses.support import TailMode


def gkd_jsd_loss(
    student_logits_BTV: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    topk_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    beta: float,
    tail: TailMode = "bucket",
    weights_BT: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> LossOutput:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, arXiv:2306.13649, Eq. 1).

    Follows TRL's ``GKDTrainer.generalized_jsd_loss`` convention (``beta=0.0`` = forward KL,
    ``1.0`` = reverse KL, per TRL's GKD docs), with ``p`` = teacher, ``q`` = student on the restricted support::

        beta == 0:  KL(p || q)                                   # forward KL
        beta == 1:  KL(q || p)                                   # reverse KL
        otherwise:  m = beta * p + (1 - beta) * q                # mixture, computed with logsumexp
                    beta * KL(p || m) + (1 - beta) * KL(q || m)

    Note (inherited from TRL): the interior formula tends to 0, not to the KLs, as beta -> 0 or 1, so
    the endpoints are special-cased and the loss is discontinuous there. beta = 0.5 is the symmetric JSD.
    Restricted to the teacher's top-k (with ``tail``, see ``support_logprobs``); with K = V it equals
    TRL's full-vocabulary loss with ``reduction="batchmean"`` and all tokens masked in.
    ``reverse_kl`` in the output is the restricted-support KL(q || p) (detached).
    """
    # Imported here, not at the top: the config variant below is part of the config tree, which `opd --help`
    # loads without torch.
    import torch

    from learner.losses.common import LossOutput, as_bool_mask, masked_mean, stat_mean
    from learner.losses.support import check_topk_inputs, kl_on_support, support_logprobs

    if isinstance(beta, bool) or not isinstance(beta, int | float) or not (0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    beta = float(beta)
    check_topk_inputs(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, weights_BT, tail)
    mask_BT = as_bool_mask(mask_BT)
    student_BTS, teacher_BTS = support_logprobs(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, tail)

    if beta == 0.0:
        jsd_BT = kl_on_support(teacher_BTS, student_BTS)
    elif beta == 1.0:
        jsd_BT = kl_on_support(student_BTS, teacher_BTS)
    else:
        # log m = log(beta * p + (1 - beta) * q), stably.
        mixture_BTS = torch.logsumexp(
            torch.stack([teacher_BTS + math.log(beta), student_BTS + math.log1p(-beta)]), dim=0
        )
        jsd_BT = beta * kl_on_support(teacher_BTS, mixture_BTS) + (1.0 - beta) * kl_on_support(student_BTS, mixture_BTS)
    loss = masked_mean(jsd_BT, mask_BT, weights_BT=weights_BT, normalizer=normalizer)
    with torch.no_grad():
        reverse_kl = stat_mean(kl_on_support(student_BTS, teacher_BTS), mask_BT)
    return LossOutput(loss=loss, tokens=mask_BT.sum(), reverse_kl=reverse_kl)


class GKDJSDConfig(BaseModel):
    """``learner.loss`` for GKD's generalized JSD."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["gkd_jsd"] = "gkd_jsd"
    beta: float = Field(0.5, ge=0, le=1, description="0: forward KL, 1: reverse KL, 0.5: symmetric JSD.")
    tail: Literal["renormalize", "bucket"] = Field("bucket", description="Mass outside the teacher's top-k: one extra bucket, or renormalize.")

    needs_teacher_topk: ClassVar[bool] = True

    def build(self) -> GKDJSD:
        return GKDJSD(beta=self.beta, tail=self.tail)


class GKDJSD:
    """The built loss: HF logits shifted onto the tokens they predict, then ``gkd_jsd_loss``."""

    def __init__(self, *, beta: float, tail: TailMode) -> None:
        self.beta = beta
        self.tail = tail

    def __call__(
        self, batch: Batch, logits_BTV: torch.Tensor, *, weights_BT: torch.Tensor | None, normalizer: float
    ) -> LossOutput:
        from learner.losses.support import require_topk

        require_topk(batch, "gkd_jsd")
        return gkd_jsd_loss(
            logits_BTV[:, :-1], batch.topk_ids_BTK[:, 1:], batch.topk_logprobs_BTK[:, 1:], batch.response_mask_BT[:, 1:],
            beta=self.beta, tail=self.tail,
            weights_BT=weights_BT[:, 1:] if weights_BT is not None else None, normalizer=normalizer,
        )
