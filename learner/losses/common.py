"""What every distillation loss shares: the output, input checks, reductions, per-token weights.

Every tensor is aligned per *predicted token*: index ``t`` of ``logprobs_BT``, ``mask_BT``,
``topk_ids_BTK`` ... all refer to the same token of the sequence (see ``learner/batching.py`` for how a
batch is laid out). Shapes are spelled in suffixes: ``B`` batch, ``T`` tokens, ``V`` vocabulary, ``K`` the
teacher's top-k, ``S`` a restricted support (``K`` or ``K + 1`` with a tail bucket).

Conventions shared by every loss in this package:

* Reduction is a token-level mean: ``sum_{b,t} mask * weight * loss_bt / normalizer`` where the
  normalizer defaults to the number of masked tokens in the call. With gradient accumulation pass
  ``normalizer=`` the masked-token count of the whole optimizer step so every token weighs the same
  whatever microbatch it landed in (the "token-level" loss of DAPO, Yu et al. 2025, arXiv:2503.14476).
* Masked (padding / prompt) positions are replaced by harmless values with ``torch.where`` *before*
  any arithmetic, so garbage there (NaN, -inf, out-of-range ids) can't leak into the loss or gradient.
* Teacher quantities are constants: they are detached here, whatever the caller passes.
* Statistics in ``LossOutput`` are detached tensors (no host sync); call ``.item()`` when logging.
  They are means over *this call's* masked tokens; weight them by ``tokens`` when aggregating.

A loss component (one file each: ``sampled_reverse_kl.py``, ``topk_kl.py``, ``gkd_jsd.py``) holds its
pure function, its pydantic config variant and a ``build()`` returning a ``Loss``: the learner calls
``loss(batch, logits_BTV, weights_BT=..., normalizer=...)`` without knowing which loss it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from learner.batching import Batch


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


class Loss(Protocol):
    """A built loss: the learner's whole interface to one (``cfg.loss.build()``).

    ``batch`` is a collated micro-batch, ``logits_BTV`` the student's raw HF logits over it (position
    ``t`` predicts token ``t + 1``); ``weights_BT`` optional per-token weights aligned with the batch
    (``token_weights``); ``normalizer`` the step's token count (see the module docstring).
    """

    def __call__(
        self, batch: Batch, logits_BTV: torch.Tensor, *, weights_BT: torch.Tensor | None, normalizer: float
    ) -> LossOutput: ...


# ---------------------------------------------------------------------------------------------------
# validation helpers


def require_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")


def require_ndim(name: str, tensor: torch.Tensor, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(tensor.shape)}")


def require_float(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def check_is_cap(is_cap: float) -> None:
    """A truncated-importance-sampling cap: a positive number (``math.inf`` disables truncation)."""
    if isinstance(is_cap, bool) or not (isinstance(is_cap, int | float) and is_cap > 0):
        raise ValueError(f"is_cap must be a positive number (math.inf to disable truncation), got {is_cap!r}")


def as_bool_mask(mask_BT: torch.Tensor) -> torch.Tensor:
    """Accept bool or 0/1 numeric masks; anything non-zero counts as a token to train on."""
    return mask_BT if mask_BT.dtype == torch.bool else mask_BT != 0


def check_weights(weights_BT: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if weights_BT is not None:
        require_ndim("weights_BT", weights_BT, 2)
        require_float("weights_BT", weights_BT)
        require_shape("weights_BT", weights_BT, shape)


def masked_mean(
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


def stat_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Detached masked mean over this call's tokens (0 when there are none)."""
    values_BT = values_BT.detach()
    total = torch.where(mask_BT, values_BT, torch.zeros_like(values_BT)).sum()
    return total / mask_BT.sum().clamp(min=1).to(total.dtype)


# ---------------------------------------------------------------------------------------------------
# the OPD advantage (shared by the sampled loss and the position weights)


def opd_advantages(behaviour_logprobs_BT: torch.Tensor, teacher_logprobs_BT: torch.Tensor) -> torch.Tensor:
    """Per-token OPD advantage ``A_t = -(log mu(y_t) - log p_T(y_t)) = log p_T(y_t) - log mu(y_t)``.

    This is minus the single-sample estimate of the per-token reverse KL KL(mu || p_T) on the sampled
    token, used as an immediate reward with no discounting and no return-to-go (discount 0), as in
    Thinking Machines Lab's "On-Policy Distillation" (2025) and Agarwal et al. 2024 (GKD).
    It uses the *behaviour* log-prob (what the actor sampled with), which is what the rollout carries;
    the ratio in ``sampled_reverse_kl_loss`` corrects for the learner having moved since.
    Returned detached: an advantage is a constant weight, never a path for gradients.
    """
    require_ndim("behaviour_logprobs_BT", behaviour_logprobs_BT, 2)
    require_ndim("teacher_logprobs_BT", teacher_logprobs_BT, 2)
    require_shape("teacher_logprobs_BT", teacher_logprobs_BT, tuple(behaviour_logprobs_BT.shape))
    return -(behaviour_logprobs_BT.detach() - teacher_logprobs_BT.detach())


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
    require_ndim("advantages_BT", advantages_BT, 2)
    require_float("advantages_BT", advantages_BT)
    require_ndim("mask_BT", mask_BT, 2)
    require_shape("mask_BT", mask_BT, tuple(advantages_BT.shape))
    if not (isinstance(gamma, int | float) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    mask_BT = as_bool_mask(mask_BT)
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
    require_ndim("mask_BT", mask_BT, 2)
    if not (isinstance(discount, int | float) and 0.0 < discount <= 1.0):
        raise ValueError(f"discount must be in (0, 1], got {discount!r}")
    mask_BT = as_bool_mask(mask_BT)
    index_BT = mask_BT.long().cumsum(dim=-1) - 1  # 0 at the first response token
    weights_BT = torch.pow(float(discount), index_BT.clamp(min=0).to(torch.float32))
    return torch.where(mask_BT, weights_BT, torch.zeros_like(weights_BT))


def token_weights(batch: Batch, *, position_gamma: float, horizon_discount_factor: float) -> torch.Tensor | None:
    """The per-token weights ``learner.position_gamma`` and ``learner.horizon_discount`` ask for (None: all 1).

    Why here and not in a loss: the weights apply to whichever loss is configured, so the learner computes
    them once per micro-batch and hands them to the loss.
    """
    mask_BT = batch.response_mask_BT
    weights_BT = None
    if position_gamma > 0:
        adv_BT = opd_advantages(batch.behaviour_logprobs_BT, batch.teacher_logprobs_BT)
        weights_BT = position_weights(adv_BT, mask_BT, gamma=position_gamma)
    if horizon_discount_factor < 1.0:
        disc_BT = horizon_discount(mask_BT, discount=horizon_discount_factor)
        weights_BT = disc_BT if weights_BT is None else weights_BT * disc_BT
    return weights_BT


# ---------------------------------------------------------------------------------------------------
# measurement


def flat_grads(losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
               dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Each loss's gradient over `params` as one flat vector (zeros for a parameter the loss does not reach), for
    measuring how loss views agree (`opd experiment premise`, `bench/kl_views.py --grad`). The graph is kept
    until the last loss, so the losses may share one forward."""
    out = []
    for i, loss in enumerate(losses):
        g = torch.autograd.grad(loss, list(params), retain_graph=i < len(losses) - 1, allow_unused=True)
        out.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten().to(dtype)
                              for x, p in zip(g, params, strict=True)]))
    return out
