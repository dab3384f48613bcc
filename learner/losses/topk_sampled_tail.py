"""Top-k reverse KL with a sampled tail: the bucket loss plus an unbiased correction from the sampled token.

One component: the loss function, its config variant (``learner.loss.kind: topk_sampled_tail``) and
``build()``. Needs ``teacher.topk > 0`` (checked when the config is loaded).

Why: ``topk_kl``'s tail bucket sees the student's mass outside the teacher's top-k only as one number, so the
gradient of where that mass goes *within* the tail is lost; on the real pair (49k ids, k = 8) that gradient
was nearly orthogonal to the exact KL's past the first tokens, and no k up to 256 fixed it
(``bench/kl_views.py --grad``, docs/experiments.md). The sampled token is a draw from the student: when it
lands in the tail, the teacher's log-prob of it (always on the wire) says how wrong the student is there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from learner.batching import Batch
    from learner.losses.common import LossOutput


def topk_sampled_tail_loss(
    student_logits_BTV: torch.Tensor,
    sampled_ids_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    topk_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    is_cap: float,
    weights_BT: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> LossOutput:
    """Reverse KL(q || p) per position: exact on the teacher's top-k S plus one tail bucket, corrected by the
    sampled token ``y`` when it falls outside S.

    With ``A_v = log q_v - log p_v`` and the bucket's log-ratio ``b = log q_tail - log p_tail`` (detached)::

        grad KL(q || p) = grad KL_bucket + sum_{v not in S} q_v (A_v - b) grad log q_v     # exact identity
                        = grad KL_bucket + E_{y ~ q} [ 1[y not in S] (A_y - b) grad log q_y ]
        loss_t          = KL_bucket_t + 1[y_t not in S] * w_t * (A_t - b_t) * (log q(y_t) - sg(log q(y_t)))
        w_t             = min(q(y_t) / mu(y_t), is_cap)       # y was drawn by the behaviour policy mu

    so the expected gradient is the exact reverse KL's (up to the cap's truncation), where the bucket's alone is
    not; the bucket serves as the control variate of the sampled term (``b`` is what the bucket assumes every
    tail token's log-ratio to be), and with K = V the correction vanishes: the loss is ``topk_kl``'s.
    ``q`` is the student's full softmax at temperature 1 (the distribution OPD distils), ``mu`` the actor's
    sampling distribution (its temperature and top-p), ``p(y)`` the teacher's log-prob of the sampled token.

    ``reverse_kl`` in the output is ``KL_bucket + 1[y not in S] w (A - b)`` averaged over masked tokens: an
    estimate of the full-vocabulary reverse KL (unbiased on policy), not the bucket's lower bound.
    """
    import torch

    from learner.losses.common import (
        LossOutput,
        as_bool_mask,
        check_is_cap,
        masked_mean,
        require_shape,
        stat_mean,
    )
    from learner.losses.support import LOG_FLOOR, check_topk_inputs, kl_on_support, support_logprobs

    check_topk_inputs(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, weights_BT, "bucket")
    shape = tuple(mask_BT.shape)
    for name, tensor in (("sampled_ids_BT", sampled_ids_BT), ("behaviour_logprobs_BT", behaviour_logprobs_BT),
                         ("teacher_logprobs_BT", teacher_logprobs_BT)):
        require_shape(name, tensor, shape)
    check_is_cap(is_cap)
    mask_BT = as_bool_mask(mask_BT)
    student_BTS, teacher_BTS = support_logprobs(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, "bucket")
    bucket_BT = kl_on_support(student_BTS, teacher_BTS)

    y_BT = torch.where(mask_BT, sampled_ids_BT.long(), torch.zeros_like(sampled_ids_BT, dtype=torch.long))
    dtype = student_BTS.dtype
    logq_y_BT = (student_logits_BTV.to(dtype).log_softmax(-1).gather(-1, y_BT.unsqueeze(-1)).squeeze(-1)
                 .clamp(min=LOG_FLOOR))
    with torch.no_grad():
        tail_BT = ~(topk_ids_BTK.long() == y_BT.unsqueeze(-1)).any(-1) & mask_BT
        advantage_BT = logq_y_BT - teacher_logprobs_BT.to(dtype).clamp(min=LOG_FLOOR, max=0.0)
        baseline_BT = student_BTS[..., -1] - teacher_BTS[..., -1]
        ratio_BT = torch.exp(logq_y_BT - behaviour_logprobs_BT.to(dtype))
        coef_BT = torch.where(tail_BT, ratio_BT.clamp(max=is_cap) * (advantage_BT - baseline_BT),
                              torch.zeros_like(ratio_BT))
    correction_BT = coef_BT * (logq_y_BT - logq_y_BT.detach())  # 0 in value, w (A - b) grad log q(y) in gradient
    loss = masked_mean(bucket_BT + correction_BT, mask_BT, weights_BT=weights_BT, normalizer=normalizer)
    with torch.no_grad():
        reverse_kl = stat_mean(bucket_BT.detach() + coef_BT, mask_BT)
        clip_fraction = stat_mean(((ratio_BT > is_cap) & tail_BT).to(dtype), mask_BT)
    return LossOutput(loss=loss, tokens=mask_BT.sum(), reverse_kl=reverse_kl, clip_fraction=clip_fraction)


class TopKSampledTailConfig(BaseModel):
    """``learner.loss`` for the top-k reverse KL whose tail is corrected by the sampled token."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["topk_sampled_tail"] = "topk_sampled_tail"
    tail_is_cap: float = Field(2.0, ge=1.0, description="Cap on q/mu, the importance weight of a sampled token "
                               "that falls outside the teacher's top-k (truncated importance sampling).")

    needs_teacher_topk: ClassVar[bool] = True

    def build(self) -> TopKSampledTail:
        return TopKSampledTail(is_cap=self.tail_is_cap)


class TopKSampledTail:
    """The built loss: HF logits shifted onto the tokens they predict, then ``topk_sampled_tail_loss``."""

    def __init__(self, *, is_cap: float) -> None:
        self.is_cap = is_cap

    def __call__(
        self, batch: Batch, logits_BTV: torch.Tensor, *, weights_BT: torch.Tensor | None, normalizer: float
    ) -> LossOutput:
        from learner.losses.support import require_topk

        require_topk(batch, "topk_sampled_tail")
        return topk_sampled_tail_loss(
            logits_BTV[:, :-1], batch.input_ids_BT[:, 1:], batch.behaviour_logprobs_BT[:, 1:],
            batch.teacher_logprobs_BT[:, 1:], batch.topk_ids_BTK[:, 1:], batch.topk_logprobs_BTK[:, 1:],
            batch.response_mask_BT[:, 1:], is_cap=self.is_cap,
            weights_BT=weights_BT[:, 1:] if weights_BT is not None else None, normalizer=normalizer,
        )
