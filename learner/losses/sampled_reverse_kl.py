"""Sampled-token reverse KL: the OPD policy-gradient loss, with truncated importance sampling.

One component: the loss function, its config variant (``learner.loss.kind: sampled_reverse_kl``) and
``build()``. It needs only the teacher's log-prob of each sampled token, so it works with
``teacher.topk: 0``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from learner.batching import Batch
    from learner.losses.common import LossOutput


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
        logprobs_BT: learner log pi(y_t), differentiable (``policy_logprobs``: the actor's sampling transform).
        behaviour_logprobs_BT: actor log mu(y_t) at sampling time.
        teacher_logprobs_BT: teacher log p_T(y_t).
        mask_BT: response tokens to train on (bool or 0/1).
        is_cap: truncation level for the importance weight, > 0 (``math.inf`` disables truncation).
        weights_BT: optional per-token weights (``position_weights``, ``horizon_discount``); None = 1.
        normalizer: denominator override for gradient accumulation (see module docstring).
    """
    _check_inputs(logprobs_BT, behaviour_logprobs_BT, teacher_logprobs_BT, mask_BT, is_cap=is_cap, weights_BT=weights_BT)
    return _tis_loss(logprobs_BT, behaviour_logprobs_BT, teacher_logprobs_BT, mask_BT, is_cap=is_cap,
                     weights_BT=weights_BT, normalizer=normalizer)


def _check_inputs(
    logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    is_cap: float,
    weights_BT: torch.Tensor | None,
) -> None:
    """Shapes, dtypes and ``is_cap`` of `sampled_reverse_kl_loss`'s inputs: a ValueError naming the argument."""
    # Imported here, not at the top: the config variant below is part of the config tree, which `opd --help`
    # loads without torch.
    from learner.losses.common import check_weights, require_float, require_ndim, require_shape

    require_ndim("logprobs_BT", logprobs_BT, 2)
    shape = tuple(logprobs_BT.shape)
    for name, tensor in (
        ("behaviour_logprobs_BT", behaviour_logprobs_BT),
        ("teacher_logprobs_BT", teacher_logprobs_BT),
        ("mask_BT", mask_BT),
    ):
        require_ndim(name, tensor, 2)
        require_shape(name, tensor, shape)
    for name, tensor in (
        ("logprobs_BT", logprobs_BT),
        ("behaviour_logprobs_BT", behaviour_logprobs_BT),
        ("teacher_logprobs_BT", teacher_logprobs_BT),
    ):
        require_float(name, tensor)
    check_weights(weights_BT, shape)
    if isinstance(is_cap, bool) or not (isinstance(is_cap, int | float) and is_cap > 0):
        raise ValueError(f"is_cap must be a positive number (math.inf to disable truncation), got {is_cap!r}")


def _tis_loss(
    logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    is_cap: float,
    weights_BT: torch.Tensor | None,
    normalizer: float | torch.Tensor | None,
) -> LossOutput:
    """The math of `sampled_reverse_kl_loss` on checked inputs (see its docstring)."""
    import torch

    from learner.losses.common import LossOutput, as_bool_mask, masked_mean, opd_advantages, stat_mean

    mask_BT = as_bool_mask(mask_BT)
    shape = tuple(logprobs_BT.shape)
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
    loss = masked_mean(per_token_BT, mask_BT, weights_BT=weights_BT, normalizer=normalizer)

    with torch.no_grad():
        tokens = mask_BT.sum()
        reverse_kl = stat_mean(behaviour_BT - teacher_BT, mask_BT)
        ratio_mean = stat_mean(ratio_BT, mask_BT)
        ratio_max = torch.where(mask_BT, ratio_BT, zeros_BT).amax() if ratio_BT.numel() else zeros_BT.sum()
        clip_fraction = stat_mean((ratio_BT > is_cap).to(dtype), mask_BT)
    return LossOutput(
        loss=loss,
        tokens=tokens,
        reverse_kl=reverse_kl,
        ratio_mean=ratio_mean,
        ratio_max=ratio_max,
        clip_fraction=clip_fraction,
    )


class SampledReverseKLConfig(BaseModel):
    """``learner.loss`` for the sampled-token reverse KL (the default)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sampled_reverse_kl"] = "sampled_reverse_kl"
    is_cap: float = Field(2.0, ge=1.0, description="Truncated importance sampling: cap on pi_theta/pi_behaviour.")

    needs_teacher_topk: ClassVar[bool] = False

    def build(self) -> SampledReverseKL:
        return SampledReverseKL(is_cap=self.is_cap)


class SampledReverseKL:
    """The built loss: log pi of the sampled tokens from the student's logits, then the TIS loss."""

    def __init__(self, *, is_cap: float) -> None:
        self.is_cap = is_cap

    def __call__(
        self, batch: Batch, logits_BTV: torch.Tensor, *, weights_BT: torch.Tensor | None, normalizer: float
    ) -> LossOutput:
        from learner.batching import policy_logprobs

        # log pi under each row's sampling transform (temperature, top-p), the distribution mu sampled from
        logprobs_BT = policy_logprobs(batch, logits_BTV)
        return sampled_reverse_kl_loss(
            logprobs_BT, batch.behaviour_logprobs_BT, batch.teacher_logprobs_BT, batch.response_mask_BT,
            is_cap=self.is_cap, weights_BT=weights_BT, normalizer=normalizer,
        )
