"""Top-k KL: the exact KL between student and teacher on the teacher's top-k support, per position.

One component: the loss function, its config variant (``learner.loss.kind: topk_kl``) and ``build()``.
Needs ``teacher.topk > 0`` (checked when the config is loaded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from learner.batching import Batch
    from learner.losses.common import LossOutput
    from learner.losses.support import TailMode

Direction = Literal["forward", "reverse"]


def topk_kl_loss(
    student_logits_BTV: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    topk_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    direction: Direction,
    tail: TailMode = "bucket",
    weights_BT: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> LossOutput:
    """Exact KL between student and teacher on the teacher's top-k support, per position.

    ``q`` = student (from its full logits, with gradient), ``p`` = teacher (top-k log-probs from the cache),
    both restricted to the support as described in ``support_logprobs`` (``tail``)::

        forward: KL(p || q) = sum_s p_s (log p_s - log q_s)     # mode-covering, = cross-entropy up to const
        reverse: KL(q || p) = sum_s q_s (log q_s - log p_s)     # mode-seeking, what OPD minimizes
        loss    = sum_t mask_t * weight_t * KL_t / normalizer

    Unlike ``sampled_reverse_kl_loss`` this is an analytic expectation over the support at each visited
    state, so it needs no importance weight (the states still come from the behaviour policy).
    ``reverse_kl`` in the output is the restricted-support KL(q || p) (detached), whatever ``direction``.
    """
    # Imported here, not at the top: the config variant below is part of the config tree, which `opd --help`
    # loads without torch.
    import torch

    from learner.losses.common import LossOutput, as_bool_mask, masked_mean, stat_mean
    from learner.losses.support import check_topk_inputs, kl_on_support, support_logprobs

    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    check_topk_inputs(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, weights_BT, tail)
    mask_BT = as_bool_mask(mask_BT)
    student_BTS, teacher_BTS = support_logprobs(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, tail)

    # forward: KL(p || q) weights by the teacher; reverse: KL(q || p) weights by the student.
    kl_BT = kl_on_support(teacher_BTS, student_BTS) if direction == "forward" else kl_on_support(student_BTS, teacher_BTS)
    loss = masked_mean(kl_BT, mask_BT, weights_BT=weights_BT, normalizer=normalizer)
    with torch.no_grad():
        reverse_BT = kl_BT if direction == "reverse" else kl_on_support(student_BTS, teacher_BTS)
        reverse_kl = stat_mean(reverse_BT, mask_BT)
    return LossOutput(loss=loss, tokens=mask_BT.sum(), reverse_kl=reverse_kl)


class TopKKLConfig(BaseModel):
    """``learner.loss`` for the top-k KL (forward or reverse)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["topk_kl"] = "topk_kl"
    direction: Direction = Field(
        "reverse", description="KL direction: reverse (student-weighted, mode-seeking, as OPD) or forward (teacher-weighted)."
    )
    tail: Literal["renormalize", "bucket"] = Field("bucket", description="Mass outside the teacher's top-k: one extra bucket, or renormalize.")

    needs_teacher_topk: ClassVar[bool] = True

    def build(self) -> TopKKL:
        return TopKKL(direction=self.direction, tail=self.tail)


class TopKKL:
    """The built loss: HF logits shifted onto the tokens they predict, then ``topk_kl_loss``."""

    def __init__(self, *, direction: Direction, tail: TailMode) -> None:
        self.direction = direction
        self.tail = tail

    def __call__(
        self, batch: Batch, logits_BTV: torch.Tensor, *, weights_BT: torch.Tensor | None, normalizer: float
    ) -> LossOutput:
        from learner.losses.support import require_topk

        require_topk(batch, "topk_kl")
        return topk_kl_loss(
            logits_BTV[:, :-1], batch.topk_ids_BTK[:, 1:], batch.topk_logprobs_BTK[:, 1:], batch.response_mask_BT[:, 1:],
            direction=self.direction, tail=self.tail,
            weights_BT=weights_BT[:, 1:] if weights_BT is not None else None, normalizer=normalizer,
        )
