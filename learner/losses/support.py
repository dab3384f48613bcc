"""The teacher's top-k support, shared by the full-distribution losses (``topk_kl``, ``gkd_jsd``).

The teacher cache keeps only the top-k log-probs per position, so these losses compare student and
teacher on a restricted support: the K tokens, optionally plus one bucket for the mass outside them
(``tail``). Shapes as in ``common.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch

from learner.losses.common import as_bool_mask, check_weights, require_float, require_ndim, require_shape

if TYPE_CHECKING:
    from learner.batching import Batch

TailMode = Literal["renormalize", "bucket"]

# Floor for every log-probability on a restricted support. exp(LOG_FLOOR) is float32's smallest
# normal number, so a floored entry contributes ~0 to a KL term as the *weighting* distribution while
# staying finite as the *reference* distribution (a reverse-KL term q * (log q - LOG_FLOOR) is a large
# but bounded penalty instead of inf/NaN). Gradients below the floor are zero, which is fine: those
# probabilities are numerically zero anyway.
LOG_FLOOR: float = math.log(torch.finfo(torch.float32).tiny)  # ~ -87.34

# Slack for teacher records stored in float16: a log-prob a hair above 0, or a top-k mass a hair above
# 1, is rounding; beyond these it is corruption and raises.
LOGPROB_TOLERANCE: float = 1e-3
MASS_TOLERANCE: float = 1e-2


def require_topk(batch: Batch, kind: str) -> None:
    """A batch scored without top-k (``teacher.topk: 0``) cannot feed a top-k loss.

    The composed config refuses this pairing at start-up; this guard covers a teacher started from a
    different config than the learner's.
    """
    if batch.topk_ids_BTK.shape[-1] == 0:
        raise ValueError(f"learner.loss.kind={kind} needs teacher top-k: set teacher.topk > 0")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both ends (Maechler 2012, "Accurately computing log(1-exp(-|a|))")."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def check_topk_inputs(
    student_logits_BTV: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    topk_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    weights_BT: torch.Tensor | None,
    tail: str,
) -> None:
    require_ndim("student_logits_BTV", student_logits_BTV, 3)
    require_float("student_logits_BTV", student_logits_BTV)
    B, T, V = student_logits_BTV.shape
    require_ndim("topk_ids_BTK", topk_ids_BTK, 3)
    K = topk_ids_BTK.shape[-1]
    require_shape("topk_ids_BTK", topk_ids_BTK, (B, T, K))
    if topk_ids_BTK.is_floating_point() or topk_ids_BTK.dtype == torch.bool:
        raise ValueError(f"topk_ids_BTK must be an integer tensor, got {topk_ids_BTK.dtype}")
    require_ndim("topk_logprobs_BTK", topk_logprobs_BTK, 3)
    require_shape("topk_logprobs_BTK", topk_logprobs_BTK, (B, T, K))
    require_float("topk_logprobs_BTK", topk_logprobs_BTK)
    require_ndim("mask_BT", mask_BT, 2)
    require_shape("mask_BT", mask_BT, (B, T))
    check_weights(weights_BT, (B, T))
    if tail not in ("renormalize", "bucket"):
        raise ValueError(f"tail must be 'renormalize' or 'bucket', got {tail!r}")
    if K < 1:
        raise ValueError("topk_ids_BTK has K=0: the top-k losses need at least one teacher token per position")
    if K > V:
        raise ValueError(f"topk_ids_BTK has K={K} > vocabulary size V={V}")
    # Data checks, on trained positions only, with a single host sync. Out-of-range ids would be a
    # device-side assert on GPU; duplicate ids would double-count mass on the support; a NaN or clearly
    # positive teacher log-prob, or top-k mass well above 1, means a corrupt teacher record.
    if B * T == 0:
        return
    mask_BT = as_bool_mask(mask_BT)
    mask_BTK = mask_BT.unsqueeze(-1).expand(B, T, K)
    out_of_range = ((topk_ids_BTK < 0) | (topk_ids_BTK >= V)) & mask_BTK
    sorted_BTK = topk_ids_BTK.sort(dim=-1).values
    duplicate = (sorted_BTK[..., 1:] == sorted_BTK[..., :-1]) & mask_BTK[..., 1:]
    teacher_BTK = topk_logprobs_BTK.detach().float()
    bad_value = (teacher_BTK.isnan() | (teacher_BTK > LOGPROB_TOLERANCE)) & mask_BTK
    safe_BTK = torch.where(mask_BTK & ~bad_value, teacher_BTK, torch.full_like(teacher_BTK, -math.inf))
    over_mass = (safe_BTK.logsumexp(dim=-1) > math.log1p(MASS_TOLERANCE)) & mask_BT
    flags = torch.stack([out_of_range.any(), duplicate.any(), bad_value.any(), over_mass.any()]).tolist()
    if flags[0]:
        raise ValueError(f"topk_ids_BTK has ids outside [0, {V}) at masked-in positions")
    if flags[1]:
        raise ValueError("topk_ids_BTK has duplicate ids within one position's top-k at masked-in positions")
    if flags[2]:
        raise ValueError(f"topk_logprobs_BTK has NaN or values > {LOGPROB_TOLERANCE} at masked-in positions")
    if flags[3]:
        raise ValueError(f"topk_logprobs_BTK: top-k probabilities sum to more than 1 + {MASS_TOLERANCE} "
                         "at masked-in positions")


def support_logprobs(
    student_logits_BTV: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    topk_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    tail: TailMode,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-distributions on the restricted support, each summing to 1.

    Returns ``(student_logq_BTS, teacher_logp_BTS)`` with ``S = K`` ("renormalize") or ``K + 1``
    ("bucket", last entry = the tail mass outside the teacher's top-k).

    * "renormalize": ``q_k = q(k) / sum_{j in topk} q(j)``, same for ``p``. Cheap, but blind to student mass
      outside the teacher's top-k, and renormalized top-k targets are biased (Anshumann et al. 2025,
      "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs").
    * "bucket": keep the K true probabilities and add one bucket each for the rest:
      ``p_tail = 1 - sum p_topk``, ``q_tail = 1 - sum q_topk``. The student is then penalized for leaking
      mass to tokens the teacher doesn't rank (the same trick as TRL's ``add_tail``).

    The student tail is computed exactly as logsumexp over the non-top-k logits (the top-k entries are
    overwritten with the dtype's most negative finite value, not -inf, so K == V stays finite), instead
    of ``log(1 - sum q_topk)``, whose gradient blows up when the student puts nearly all mass on the
    top-k. This costs one extra B*T*V buffer.
    """
    B, T, _ = student_logits_BTV.shape
    K = topk_ids_BTK.shape[-1]
    mask_BT = as_bool_mask(mask_BT)
    dtype = torch.promote_types(student_logits_BTV.dtype, torch.float32)
    logits_BTV = student_logits_BTV.to(dtype)
    mask_BT1 = mask_BT.unsqueeze(-1)

    # Padding positions: valid ids (0..K-1) and a uniform teacher, so nothing there is non-finite.
    safe_ids_BTK = torch.arange(K, device=topk_ids_BTK.device).expand(B, T, K)
    ids_BTK = torch.where(mask_BT1, topk_ids_BTK.long(), safe_ids_BTK)
    uniform_BTK = torch.full((B, T, K), -math.log(K + 1), dtype=dtype, device=logits_BTV.device)
    teacher_BTK = torch.where(mask_BT1, topk_logprobs_BTK.detach().to(dtype), uniform_BTK)
    teacher_BTK = teacher_BTK.clamp(min=LOG_FLOOR, max=0.0)  # -inf (zero prob) -> floor; +eps rounding -> 0

    lse_BT1 = logits_BTV.logsumexp(dim=-1, keepdim=True)
    student_BTK = logits_BTV.gather(-1, ids_BTK) - lse_BT1  # log q(k) under the full softmax

    if tail == "renormalize":
        student_BTS = student_BTK - student_BTK.logsumexp(dim=-1, keepdim=True)
        teacher_BTS = teacher_BTK - teacher_BTK.logsumexp(dim=-1, keepdim=True)
    else:
        very_negative = torch.finfo(dtype).min
        rest_BTV = logits_BTV.scatter(-1, ids_BTK, very_negative)
        student_tail_BT1 = rest_BTV.logsumexp(dim=-1, keepdim=True) - lse_BT1  # log(1 - sum q_topk)
        # The teacher's top-k may sum to slightly > 1 after fp16 rounding: renormalize in that case so
        # the tail is exactly 0 (then floored) instead of log of a negative number.
        teacher_mass_BT1 = teacher_BTK.logsumexp(dim=-1, keepdim=True)
        teacher_BTK = teacher_BTK - teacher_mass_BT1.clamp(min=0.0)
        teacher_tail_BT1 = log1mexp(teacher_mass_BT1.clamp(max=0.0))  # log(1 - sum p_topk); -inf if 0
        student_BTS = torch.cat([student_BTK, student_tail_BT1], dim=-1)
        teacher_BTS = torch.cat([teacher_BTK, teacher_tail_BT1], dim=-1)
    return student_BTS.clamp(min=LOG_FLOOR), teacher_BTS.clamp(min=LOG_FLOOR)


def kl_on_support(logp_BTS: torch.Tensor, logq_BTS: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_s p_s (log p_s - log q_s) per position; inputs are finite (floored) log-probs."""
    return (logp_BTS.exp() * (logp_BTS - logq_BTS)).sum(dim=-1)
