"""Distillation losses for the learner.

Every tensor is aligned per *predicted token*: index ``t`` of ``logprobs_BT``, ``mask_BT``,
``topk_ids_BTK`` ... all refer to the same token of the sequence (see ``learner/batching.py`` for how a
batch is laid out). Shapes are spelled in suffixes: ``B`` batch, ``T`` tokens, ``V`` vocabulary, ``K`` the
teacher's top-k, ``S`` a restricted support (``K`` or ``K + 1`` with a tail bucket).

With raw HF logits (logits at ``t`` predict token ``t + 1``) pass views, not copies::

    loss = topk_kl_loss(logits_BTV[:, :-1], batch.topk_ids_BTK[:, 1:], batch.topk_logprobs_BTK[:, 1:],
                        batch.response_mask_BT[:, 1:], direction="forward")

Conventions shared by every loss here:

* Reduction is a token-level mean: ``sum_{b,t} mask * weight * loss_bt / normalizer`` where the
  normalizer defaults to the number of masked tokens in the call. With gradient accumulation pass
  ``normalizer=`` the masked-token count of the whole optimizer step so every token weighs the same
  whatever microbatch it landed in (the "token-level" loss of DAPO, Yu et al. 2025, arXiv:2503.14476).
* Masked (padding / prompt) positions are replaced by harmless values with ``torch.where`` *before*
  any arithmetic, so garbage there (NaN, -inf, out-of-range ids) can't leak into the loss or gradient.
* Teacher quantities are constants: they are detached here, whatever the caller passes.
* Statistics in ``LossOutput`` are detached tensors (no host sync); call ``.item()`` when logging.
  They are means over *this call's* masked tokens; weight them by ``tokens`` when aggregating.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Direction = Literal["forward", "reverse"]
TailMode = Literal["renormalize", "bucket"]

# Floor for every log-probability on a restricted support. exp(LOG_FLOOR) is float32's smallest
# normal number, so a floored entry contributes ~0 to a KL term as the *weighting* distribution while
# staying finite as the *reference* distribution (a reverse-KL term q * (log q - LOG_FLOOR) is a large
# but bounded penalty instead of inf/NaN). Gradients below the floor are zero, which is fine: those
# probabilities are numerically zero anyway.
LOG_FLOOR: float = math.log(torch.finfo(torch.float32).tiny)  # ~ -87.34

# Slack for teacher records stored in float16: a log-prob a hair above 0, or a top-k mass a hair above
# 1, is rounding; beyond these it is corruption and raises.
_LOGPROB_TOLERANCE: float = 1e-3
_MASS_TOLERANCE: float = 1e-2


@dataclass(frozen=True)
class LossOutput:
    """A scalar loss to backpropagate plus detached diagnostics.

    ``ratio_*`` and ``clip_fraction`` are importance-sampling diagnostics and are ``None`` for losses that
    use no importance weights (the full-distribution top-k losses).
    """

    loss: torch.Tensor  # scalar, differentiable
    tokens: torch.Tensor  # scalar, number of masked tokens in this call
    reverse_kl: torch.Tensor  # scalar, mean reverse-KL estimate over masked tokens (see each loss)
    ratio_mean: torch.Tensor | None = None  # mean of pi_theta / mu over masked tokens (untruncated)
    ratio_max: torch.Tensor | None = None  # max of pi_theta / mu over masked tokens (untruncated)
    clip_fraction: torch.Tensor | None = None  # fraction of masked tokens with ratio > is_cap


# ---------------------------------------------------------------------------------------------------
# validation helpers


def _require_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")


def _require_ndim(name: str, tensor: torch.Tensor, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(tensor.shape)}")


def _require_float(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _as_bool_mask(mask_BT: torch.Tensor) -> torch.Tensor:
    """Accept bool or 0/1 numeric masks; anything non-zero counts as a token to train on."""
    return mask_BT if mask_BT.dtype == torch.bool else mask_BT != 0


def _check_weights(weights_BT: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if weights_BT is not None:
        _require_ndim("weights_BT", weights_BT, 2)
        _require_float("weights_BT", weights_BT)
        _require_shape("weights_BT", weights_BT, shape)


def _masked_mean(
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    weights_BT: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """sum(mask * weights * values) / normalizer, with normalizer = #masked tokens (>= 1) by default.

    ``torch.where`` (not multiplication) so NaN/inf at masked positions gives 0, not NaN; the result stays
    attached to the graph even with zero masked tokens (a zero-gradient loss, needed by DDP).
    """
    if weights_BT is not None:
        values_BT = values_BT * weights_BT.detach().to(values_BT.dtype)
    total = torch.where(mask_BT, values_BT, torch.zeros_like(values_BT)).sum()
    if normalizer is None:
        denom = mask_BT.sum().clamp(min=1).to(total.dtype)
    else:
        if isinstance(normalizer, torch.Tensor):
            denom = normalizer.detach().to(device=total.device, dtype=total.dtype)
        else:
            if not (math.isfinite(float(normalizer)) and float(normalizer) > 0):
                raise ValueError(f"normalizer must be a positive finite number, got {normalizer}")
            denom = torch.tensor(float(normalizer), device=total.device, dtype=total.dtype)
    return total / denom


def _stat_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Detached masked mean over this call's tokens (0 when there are none)."""
    values_BT = values_BT.detach()
    total = torch.where(mask_BT, values_BT, torch.zeros_like(values_BT)).sum()
    return total / mask_BT.sum().clamp(min=1).to(total.dtype)


# ---------------------------------------------------------------------------------------------------
# sampled-token reverse KL (the OPD policy-gradient loss)


def opd_advantages(behaviour_logprobs_BT: torch.Tensor, teacher_logprobs_BT: torch.Tensor) -> torch.Tensor:
    """Per-token OPD advantage ``A_t = -(log mu(y_t) - log p_T(y_t)) = log p_T(y_t) - log mu(y_t)``.

    This is minus the single-sample estimate of the per-token reverse KL KL(mu || p_T) on the sampled
    token, used as an immediate reward with no discounting and no return-to-go (discount 0), as in
    Thinking Machines Lab's "On-Policy Distillation" (2025) and Agarwal et al. 2024 (GKD).
    It uses the *behaviour* log-prob (what the actor sampled with), which is what the rollout carries;
    the ratio in ``sampled_reverse_kl_loss`` corrects for the learner having moved since.
    Returned detached: an advantage is a constant weight, never a path for gradients.
    """
    _require_ndim("behaviour_logprobs_BT", behaviour_logprobs_BT, 2)
    _require_ndim("teacher_logprobs_BT", teacher_logprobs_BT, 2)
    _require_shape("teacher_logprobs_BT", teacher_logprobs_BT, tuple(behaviour_logprobs_BT.shape))
    return -(behaviour_logprobs_BT.detach() - teacher_logprobs_BT.detach())


def sampled_reverse_kl_loss(
    logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    is_cap: float,
    weights_BT: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> LossOutput:
    """Truncated-importance-sampling policy gradient on the sampled-token reverse KL.

    Per masked token (``pi`` = learner policy with gradient, ``mu`` = behaviour policy that sampled y_t)::

        ratio_t = exp(log pi(y_t) - log mu(y_t))            # detached
        w_t     = min(ratio_t, is_cap)                      # truncated IS weight, detached
        A_t     = log p_T(y_t) - log mu(y_t)                # opd_advantages, detached
        loss_t  = -w_t * A_t * log pi(y_t)                  # REINFORCE form
        loss    = sum_t mask_t * weight_t * loss_t / normalizer

    Gradient: ``-w_t * A_t * grad log pi(y_t)``. For ratio <= is_cap this equals the gradient of the
    "importance_sampling" objective ``-ratio_t * A_t`` (ratio with gradient) used by Tinker's OPD recipe,
    because ``grad ratio = ratio * grad log pi``. Above the cap we truncate the *weight* (Ionides 2008,
    "Truncated importance sampling"; the rho-bar truncation of IMPALA/V-trace, Espeholt et al. 2018;
    the TIS correction used by verl/slime/AReaL) instead of zeroing the gradient as PPO's clip would:
    the token still pushes in its direction, with bounded variance. There is no PPO trust region here:
    each rollout is used for one update, so off-policyness comes only from actor lag, which TIS handles.

    The loss *value* is not a divergence (it scales with log pi); monitor ``reverse_kl`` instead, which is
    the sampled estimate ``mean(log mu - log p_T)`` of KL(mu || p_T) over masked tokens.

    Args:
        logprobs_BT: learner log pi(y_t), differentiable (``gather_response_logprobs``).
        behaviour_logprobs_BT: actor log mu(y_t) at sampling time.
        teacher_logprobs_BT: teacher log p_T(y_t).
        mask_BT: response tokens to train on (bool or 0/1).
        is_cap: truncation level for the importance weight, > 0 (``math.inf`` disables truncation).
        weights_BT: optional per-token weights (``position_weights``, ``horizon_discount``); None = 1.
        normalizer: denominator override for gradient accumulation (see module docstring).
    """
    _require_ndim("logprobs_BT", logprobs_BT, 2)
    shape = tuple(logprobs_BT.shape)
    for name, tensor in (
        ("behaviour_logprobs_BT", behaviour_logprobs_BT),
        ("teacher_logprobs_BT", teacher_logprobs_BT),
        ("mask_BT", mask_BT),
    ):
        _require_ndim(name, tensor, 2)
        _require_shape(name, tensor, shape)
    for name, tensor in (
        ("logprobs_BT", logprobs_BT),
        ("behaviour_logprobs_BT", behaviour_logprobs_BT),
        ("teacher_logprobs_BT", teacher_logprobs_BT),
    ):
        _require_float(name, tensor)
    _check_weights(weights_BT, shape)
    if isinstance(is_cap, bool) or not (isinstance(is_cap, int | float) and is_cap > 0):
        raise ValueError(f"is_cap must be a positive number (math.inf to disable truncation), got {is_cap!r}")

    mask_BT = _as_bool_mask(mask_BT)
    dtype = torch.promote_types(logprobs_BT.dtype, torch.float32)
    zeros_BT = torch.zeros(shape, dtype=dtype, device=logprobs_BT.device)
    logprobs_BT = logprobs_BT.to(dtype)
    # Sanitize padding before any arithmetic so nothing non-finite is ever produced there.
    behaviour_BT = torch.where(mask_BT, behaviour_logprobs_BT.detach().to(dtype), zeros_BT)
    teacher_BT = torch.where(mask_BT, teacher_logprobs_BT.detach().to(dtype), zeros_BT)

    # ratio = pi / mu on the sampled token; computed from detached log-probs: it is a weight.
    log_ratio_BT = torch.where(mask_BT, logprobs_BT.detach() - behaviour_BT, zeros_BT)
    ratio_BT = torch.exp(log_ratio_BT)
    is_weight_BT = ratio_BT.clamp(max=is_cap)  # truncated IS weight min(ratio, C)
    advantages_BT = opd_advantages(behaviour_BT, teacher_BT)  # log p_T - log mu

    # REINFORCE with a constant per-token coefficient: d loss_t / d log pi = -w_t * A_t.
    per_token_BT = -(is_weight_BT * advantages_BT) * logprobs_BT
    loss = _masked_mean(per_token_BT, mask_BT, weights_BT=weights_BT, normalizer=normalizer)

    with torch.no_grad():
        tokens = mask_BT.sum()
        reverse_kl = _stat_mean(behaviour_BT - teacher_BT, mask_BT)
        ratio_mean = _stat_mean(ratio_BT, mask_BT)
        ratio_max = torch.where(mask_BT, ratio_BT, zeros_BT).amax() if ratio_BT.numel() else zeros_BT.sum()
        clip_fraction = _stat_mean((ratio_BT > is_cap).to(dtype), mask_BT)
    return LossOutput(
        loss=loss,
        tokens=tokens,
        reverse_kl=reverse_kl,
        ratio_mean=ratio_mean,
        ratio_max=ratio_max,
        clip_fraction=clip_fraction,
    )


# ---------------------------------------------------------------------------------------------------
# full-distribution losses on the teacher's top-k support


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both ends (Maechler 2012, "Accurately computing log(1-exp(-|a|))")."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _check_topk_inputs(
    student_logits_BTV: torch.Tensor,
    topk_ids_BTK: torch.Tensor,
    topk_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    weights_BT: torch.Tensor | None,
    tail: str,
) -> None:
    _require_ndim("student_logits_BTV", student_logits_BTV, 3)
    _require_float("student_logits_BTV", student_logits_BTV)
    B, T, V = student_logits_BTV.shape
    _require_ndim("topk_ids_BTK", topk_ids_BTK, 3)
    K = topk_ids_BTK.shape[-1]
    _require_shape("topk_ids_BTK", topk_ids_BTK, (B, T, K))
    if topk_ids_BTK.is_floating_point() or topk_ids_BTK.dtype == torch.bool:
        raise ValueError(f"topk_ids_BTK must be an integer tensor, got {topk_ids_BTK.dtype}")
    _require_ndim("topk_logprobs_BTK", topk_logprobs_BTK, 3)
    _require_shape("topk_logprobs_BTK", topk_logprobs_BTK, (B, T, K))
    _require_float("topk_logprobs_BTK", topk_logprobs_BTK)
    _require_ndim("mask_BT", mask_BT, 2)
    _require_shape("mask_BT", mask_BT, (B, T))
    _check_weights(weights_BT, (B, T))
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
    mask_BT = _as_bool_mask(mask_BT)
    mask_BTK = mask_BT.unsqueeze(-1).expand(B, T, K)
    out_of_range = ((topk_ids_BTK < 0) | (topk_ids_BTK >= V)) & mask_BTK
    sorted_BTK = topk_ids_BTK.sort(dim=-1).values
    duplicate = (sorted_BTK[..., 1:] == sorted_BTK[..., :-1]) & mask_BTK[..., 1:]
    teacher_BTK = topk_logprobs_BTK.detach().float()
    bad_value = (teacher_BTK.isnan() | (teacher_BTK > _LOGPROB_TOLERANCE)) & mask_BTK
    safe_BTK = torch.where(mask_BTK & ~bad_value, teacher_BTK, torch.full_like(teacher_BTK, -math.inf))
    over_mass = (safe_BTK.logsumexp(dim=-1) > math.log1p(_MASS_TOLERANCE)) & mask_BT
    flags = torch.stack([out_of_range.any(), duplicate.any(), bad_value.any(), over_mass.any()]).tolist()
    if flags[0]:
        raise ValueError(f"topk_ids_BTK has ids outside [0, {V}) at masked-in positions")
    if flags[1]:
        raise ValueError("topk_ids_BTK has duplicate ids within one position's top-k at masked-in positions")
    if flags[2]:
        raise ValueError(f"topk_logprobs_BTK has NaN or values > {_LOGPROB_TOLERANCE} at masked-in positions")
    if flags[3]:
        raise ValueError(f"topk_logprobs_BTK: top-k probabilities sum to more than 1 + {_MASS_TOLERANCE} "
                         "at masked-in positions")


def _support_logprobs(
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
    mask_BT = _as_bool_mask(mask_BT)
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
        teacher_tail_BT1 = _log1mexp(teacher_mass_BT1.clamp(max=0.0))  # log(1 - sum p_topk); -inf if 0
        student_BTS = torch.cat([student_BTK, student_tail_BT1], dim=-1)
        teacher_BTS = torch.cat([teacher_BTK, teacher_tail_BT1], dim=-1)
    return student_BTS.clamp(min=LOG_FLOOR), teacher_BTS.clamp(min=LOG_FLOOR)


def _kl_BT(logp_BTS: torch.Tensor, logq_BTS: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_s p_s (log p_s - log q_s) per position; inputs are finite (floored) log-probs."""
    return (logp_BTS.exp() * (logp_BTS - logq_BTS)).sum(dim=-1)


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
    both restricted to the support as described in ``_support_logprobs`` (``tail``)::

        forward: KL(p || q) = sum_s p_s (log p_s - log q_s)     # mode-covering, = cross-entropy up to const
        reverse: KL(q || p) = sum_s q_s (log q_s - log p_s)     # mode-seeking, what OPD minimizes
        loss    = sum_t mask_t * weight_t * KL_t / normalizer

    Unlike ``sampled_reverse_kl_loss`` this is an analytic expectation over the support at each visited
    state, so it needs no importance weight (the states still come from the behaviour policy).
    ``reverse_kl`` in the output is the restricted-support KL(q || p) (detached), whatever ``direction``.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    _check_topk_inputs(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, weights_BT, tail)
    mask_BT = _as_bool_mask(mask_BT)
    student_BTS, teacher_BTS = _support_logprobs(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, tail)

    # forward: KL(p || q) weights by the teacher; reverse: KL(q || p) weights by the student.
    kl_BT = _kl_BT(teacher_BTS, student_BTS) if direction == "forward" else _kl_BT(student_BTS, teacher_BTS)
    loss = _masked_mean(kl_BT, mask_BT, weights_BT=weights_BT, normalizer=normalizer)
    with torch.no_grad():
        reverse_BT = kl_BT if direction == "reverse" else _kl_BT(student_BTS, teacher_BTS)
        reverse_kl = _stat_mean(reverse_BT, mask_BT)
    return LossOutput(loss=loss, tokens=mask_BT.sum(), reverse_kl=reverse_kl)


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
    Restricted to the teacher's top-k (with ``tail``, see ``_support_logprobs``); with K = V it equals
    TRL's full-vocabulary loss with ``reduction="batchmean"`` and all tokens masked in.
    ``reverse_kl`` in the output is the restricted-support KL(q || p) (detached).
    """
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not (0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    beta = float(beta)
    _check_topk_inputs(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, weights_BT, tail)
    mask_BT = _as_bool_mask(mask_BT)
    student_BTS, teacher_BTS = _support_logprobs(student_logits_BTV, topk_ids_BTK, topk_logprobs_BTK, mask_BT, tail)

    if beta == 0.0:
        jsd_BT = _kl_BT(teacher_BTS, student_BTS)
    elif beta == 1.0:
        jsd_BT = _kl_BT(student_BTS, teacher_BTS)
    else:
        # log m = log(beta * p + (1 - beta) * q), stably.
        mixture_BTS = torch.logsumexp(
            torch.stack([teacher_BTS + math.log(beta), student_BTS + math.log1p(-beta)]), dim=0
        )
        jsd_BT = beta * _kl_BT(teacher_BTS, mixture_BTS) + (1.0 - beta) * _kl_BT(student_BTS, mixture_BTS)
    loss = _masked_mean(jsd_BT, mask_BT, weights_BT=weights_BT, normalizer=normalizer)
    with torch.no_grad():
        reverse_kl = _stat_mean(_kl_BT(student_BTS, teacher_BTS), mask_BT)
    return LossOutput(loss=loss, tokens=mask_BT.sum(), reverse_kl=reverse_kl)


# ---------------------------------------------------------------------------------------------------
# optional per-token weights (both off by default: callers pass weights_BT=None)


@torch.no_grad()
def position_weights(advantages_BT: torch.Tensor, mask_BT: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Position-weighted OPD: ``w_t = 1 + gamma * (1 - cumsum_{s<=t} |A_s| / sum_s |A_s|)`` per sequence.

    Why: a token's reverse-KL advantage is credited only to itself (discount 0), yet an early divergence
    from the teacher is what derails the rest of a rollout. This upweights tokens that come *before* most
    of the sequence's total divergence (w -> 1 + gamma at the start, -> 1 after the last divergent token),
    a cheap proxy for return-to-go credit without its variance. ``gamma = 0`` gives all-ones.
    Only masked tokens contribute to the sums; masked-out positions get weight 0; a sequence with
    ``sum |A| == 0`` (no signal) gets weight 1. Detached.
    """
    _require_ndim("advantages_BT", advantages_BT, 2)
    _require_float("advantages_BT", advantages_BT)
    _require_ndim("mask_BT", mask_BT, 2)
    _require_shape("mask_BT", mask_BT, tuple(advantages_BT.shape))
    if not (isinstance(gamma, int | float) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    mask_BT = _as_bool_mask(mask_BT)
    dtype = torch.promote_types(advantages_BT.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=advantages_BT.device)
    abs_adv_BT = torch.where(mask_BT, advantages_BT.to(dtype).abs(), zero)
    cum_BT = abs_adv_BT.cumsum(dim=-1)  # inclusive: token t counts its own divergence as "done"
    total_B1 = cum_BT[:, -1:] if cum_BT.shape[-1] else cum_BT.sum(dim=-1, keepdim=True)
    frac_done_BT = torch.where(total_B1 > 0, cum_BT / total_B1.clamp(min=torch.finfo(dtype).tiny), 1.0)
    weights_BT = 1.0 + gamma * (1.0 - frac_done_BT)
    return torch.where(mask_BT, weights_BT, torch.zeros_like(weights_BT))


@torch.no_grad()
def horizon_discount(mask_BT: torch.Tensor, *, discount: float) -> torch.Tensor:
    """``w_t = discount ** j`` where ``j`` is the index of token t among the masked tokens of its row.

    Why: with truncated rollouts a sequence contributes up to its horizon; geometric down-weighting of
    later tokens favours the early decisions every prefix shares. ``discount = 1`` gives all-ones.
    Masked-out positions get weight 0. Returns float32.
    """
    _require_ndim("mask_BT", mask_BT, 2)
    if not (isinstance(discount, int | float) and 0.0 < discount <= 1.0):
        raise ValueError(f"discount must be in (0, 1], got {discount!r}")
    mask_BT = _as_bool_mask(mask_BT)
    index_BT = mask_BT.long().cumsum(dim=-1) - 1  # 0 at the first response token
    weights_BT = torch.pow(float(discount), index_BT.clamp(min=0).to(torch.float32))
    return torch.where(mask_BT, weights_BT, torch.zeros_like(weights_BT))


LossFn = Callable[..., LossOutput]

LOSSES: dict[str, LossFn] = {
    "sampled_reverse_kl": sampled_reverse_kl_loss,
    "topk_kl": topk_kl_loss,
    "gkd_jsd": gkd_jsd_loss,
}
