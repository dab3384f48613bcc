"""Baselines (control variates) for the sampled-token reverse KL: lower variance, same expected gradient.

WHY. ``sampled_reverse_kl_loss`` is REINFORCE with the per-token advantage ``A_t = log p_T(y_t) - log mu(y_t)``
(Thinking Machines Lab, "On-Policy Distillation", 2025: no baseline). Its expectation is ``-KL_t < 0``, so
without a baseline *every* sampled token is pushed down and the step's direction is dominated by which
tokens happened to be drawn; on the experiment task this single-sample noise, plus a heavy tail of tokens
the teacher finds very unlikely (``A`` down to about -15), made the student leak mass to unsampled tokens,
stop emitting EOS and diverge where the exact KL converges (docs/experiments.md, "Loss stability").

Subtracting ``b_t`` that does not depend on the sampled token ``y_t`` keeps the expected gradient::

    E_{y ~ pi}[(A(y) - b) grad log pi(y)] = E[A grad log pi] - b * sum_y pi(y) grad log pi(y)
                                          = E[A grad log pi] - b * grad sum_y pi(y) = E[A grad log pi]

(on-policy; with the importance weight ``pi / mu`` the same holds under ``mu``; truncation of the weight
is the only bias, as before). Two baselines, both detached:

* ``topk_baseline``: per position, ``b_t = sum_s pi_S(s) (log p_T,S(s) - log pi_S(s)) = -KL_S(pi || p_T)``
  on the teacher's top-k support with a tail bucket (``support.py``). With ``K = V`` this is exactly
  ``E_pi[A_t]``, the usual value baseline; with a smaller K it is an approximation of it, which costs
  variance, never bias. Needs the student's full logits (the learner has them) and the teacher's top-k.
* ``leave_one_out_baseline``: without top-k (``teacher.topk: 0``) nothing per position is known, so each
  row gets the mean advantage of the *other* rows' tokens (RLOO, Kool et al. 2019; Ahmadian et al. 2024).
  Other rows are independent rollouts, so ``b`` does not depend on this row's tokens: unbiased. (A mean
  that included the row's own later tokens would not be: they depend on its earlier samples.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from learner.losses.common import as_bool_mask, require_ndim, require_shape
from learner.losses.support import check_topk_inputs, kl_on_support, support_logprobs

if TYPE_CHECKING:
    from learner.batching import Batch


@torch.no_grad()
def topk_baseline(
    logits_BTV: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    topk_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
) -> torch.Tensor:
    """``b_t = -KL_S(pi_t || p_T,t)`` on the bucketed top-k support, aligned with the inputs; detached.

    All inputs are aligned per predicted token (pass HF logits already shifted: ``logits_BTV[:, :-1]``
    with ``topk_*[:, 1:]``). ``logits_BTV`` are the logits of the distribution the tokens were sampled
    from (divide by the sampling temperature first; a top-p nucleus is ignored: any token-independent
    baseline is unbiased, a closer one only lowers variance). Masked-out positions get 0.
    """
    check_topk_inputs(logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, None, "bucket")
    mask_BT = as_bool_mask(mask_BT)
    student_BTS, teacher_BTS = support_logprobs(logits_BTV.detach(), topk_ids_BTK, topk_logprobs_BTK, mask_BT, "bucket")
    baseline_BT = -kl_on_support(student_BTS, teacher_BTS)
    return torch.where(mask_BT, baseline_BT, torch.zeros_like(baseline_BT))


@torch.no_grad()
def leave_one_out_baseline(advantages_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per row, the mean advantage over the masked tokens of every *other* row; 0 with no other tokens.

    Returns ``[B, T]`` (the row's value at its masked positions, 0 elsewhere); detached. Rows are
    independent rollouts (or prefixes of them), which is what makes the baseline unbiased.
    """
    require_ndim("advantages_BT", advantages_BT, 2)
    require_ndim("mask_BT", mask_BT, 2)
    require_shape("mask_BT", mask_BT, tuple(advantages_BT.shape))
    mask_BT = as_bool_mask(mask_BT)
    dtype = torch.promote_types(advantages_BT.dtype, torch.float32)
    values_BT = torch.where(mask_BT, advantages_BT.detach().to(dtype), torch.zeros((), dtype=dtype))
    sum_B = values_BT.sum(dim=-1)
    count_B = mask_BT.sum(dim=-1).to(dtype)
    others_sum_B = sum_B.sum() - sum_B
    others_count_B = count_B.sum() - count_B
    mean_B = torch.where(others_count_B > 0, others_sum_B / others_count_B.clamp(min=1), torch.zeros_like(sum_B))
    return torch.where(mask_BT, mean_B[:, None].expand_as(values_BT), torch.zeros_like(values_BT))


def batch_baseline(batch: Batch, logits_BTV: torch.Tensor, mode: str) -> torch.Tensor | None:
    """The baseline ``learner.loss.baseline`` asks for on a collated batch (HF logits), aligned per token.

    ``none`` -> None; ``topk`` -> `topk_baseline` (a batch without top-k is an error naming the key);
    ``batch`` -> `leave_one_out_baseline`; ``auto`` -> topk when the batch carries top-k, else batch.
    The top-k baseline is computed on the logits divided by each row's sampling temperature.
    """
    from learner.losses.common import opd_advantages
    from learner.losses.support import require_topk

    if mode == "none":
        return None
    has_topk = batch.topk_ids_BTK.shape[-1] > 0
    if mode == "topk" or (mode == "auto" and has_topk):
        require_topk(batch, "sampled_reverse_kl with learner.loss.baseline=topk")
        temperature_B11 = batch.temperature_B.to(device=logits_BTV.device, dtype=logits_BTV.dtype)[:, None, None]
        baseline_BT = torch.zeros(batch.response_mask_BT.shape, dtype=torch.promote_types(logits_BTV.dtype, torch.float32),
                                  device=logits_BTV.device)
        # HF logits at t predict token t + 1: the baseline of token t comes from the logits at t - 1
        baseline_BT[:, 1:] = topk_baseline(logits_BTV[:, :-1] / temperature_B11, batch.topk_ids_BTK[:, 1:],
                                           batch.topk_logprobs_BTK[:, 1:], batch.response_mask_BT[:, 1:])
        return baseline_BT
    if mode in ("batch", "auto"):
        advantages_BT = opd_advantages(batch.behaviour_logprobs_BT, batch.teacher_logprobs_BT)
        return leave_one_out_baseline(advantages_BT, batch.response_mask_BT)
    raise ValueError(f"learner.loss.baseline must be none, auto, topk or batch, got {mode!r}")
