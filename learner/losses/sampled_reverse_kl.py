"""Sampled-token reverse KL: the OPD policy-gradient loss, with truncated importance sampling.

One component: the loss function, its config variant (``learner.loss.kind: sampled_reverse_kl``) and
``build()``. It needs only the teacher's log-prob of each sampled token, so it works with
``teacher.topk: 0``, and is what an unset ``learner.loss`` means there (``opd/config.py``); with top-k the
default is ``topk_kl``. Without a baseline and an advantage clip this estimator (Thinking Machines Lab's
OPD recipe) stopped emitting EOS and diverged at lr 1e-3 on the experiment task where the exact KL converged;
both are on by default (docs/experiments.md, "Loss stability").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from learner.batching import Batch
    from learner.losses.common import LossOutput

# Default bound on |A - b| (nats): 1 kept EOS in both seeds at lr 1e-3, 2 lost it in one (docs/experiments.md).
ADVANTAGE_CLIP_DEFAULT: float | None = 1.0


def sampled_reverse_kl_loss(
    logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    is_cap: float,
    weights_BT: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    baseline_BT: torch.Tensor | None = None,
    advantage_clip: float | None = None,
) -> LossOutput:
    """Truncated-importance-sampling policy gradient on the sampled-token reverse KL.

    Per masked token (``pi`` = learner policy with gradient, ``mu`` = behaviour policy that sampled y_t)::

        ratio_t = exp(log pi(y_t) - log mu(y_t))            # detached
        w_t     = min(ratio_t, is_cap)                      # truncated IS weight, detached
        A_t     = log p_T(y_t) - log mu(y_t) - b_t          # opd_advantages minus a baseline, detached
        A_t     = clamp(A_t, -c, c)                         # only with advantage_clip = c
        loss_t  = -w_t * A_t * log pi(y_t)                  # REINFORCE form
        loss    = sum_t mask_t * weight_t * loss_t / normalizer

    ``b_t`` (``baseline_BT``, default 0 = the TML OPD post's estimator) must not depend on the sampled
    token y_t; then it leaves the expected gradient unchanged and only lowers its variance
    (``learner/losses/baselines.py``). ``advantage_clip`` bounds the heavy tail of tokens the teacher
    finds very unlikely; unlike the baseline it is a bias (a departure from the post and the paper),
    off by default in this function.

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
        baseline_BT: optional per-token baseline ``b_t`` (detached; ``baselines.py``); None = 0.
        advantage_clip: optional bound c > 0 on ``|A_t - b_t|``; None = unbounded.
    """
    _check_inputs(logprobs_BT, behaviour_logprobs_BT, teacher_logprobs_BT, mask_BT, is_cap=is_cap, weights_BT=weights_BT)
    _check_advantage_options(baseline_BT, advantage_clip, tuple(logprobs_BT.shape))
    return _tis_loss(logprobs_BT, behaviour_logprobs_BT, teacher_logprobs_BT, mask_BT, is_cap=is_cap,
                     weights_BT=weights_BT, normalizer=normalizer, baseline_BT=baseline_BT,
                     advantage_clip=advantage_clip)


def _check_advantage_options(baseline_BT: torch.Tensor | None, advantage_clip: float | None,
                             shape: tuple[int, ...]) -> None:
    """``baseline_BT`` has the batch's shape and is float; ``advantage_clip`` is None or a positive number."""
    from learner.losses.common import require_float, require_ndim, require_shape

    if baseline_BT is not None:
        require_ndim("baseline_BT", baseline_BT, 2)
        require_shape("baseline_BT", baseline_BT, shape)
        require_float("baseline_BT", baseline_BT)
    if advantage_clip is not None and (isinstance(advantage_clip, bool) or not (
            isinstance(advantage_clip, int | float) and advantage_clip > 0)):
        raise ValueError(f"advantage_clip must be None or a positive number, got {advantage_clip!r}")


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
    from learner.losses.common import check_is_cap, check_weights, require_float, require_ndim, require_shape

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
    check_is_cap(is_cap)


def _tis_loss(
    logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    is_cap: float,
    weights_BT: torch.Tensor | None,
    normalizer: float | torch.Tensor | None,
    baseline_BT: torch.Tensor | None = None,
    advantage_clip: float | None = None,
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
    if baseline_BT is not None:  # a token-independent shift: same expected gradient, less variance
        advantages_BT = advantages_BT - torch.where(mask_BT, baseline_BT.detach().to(dtype), zeros_BT)
    if advantage_clip is not None:  # bounded: a bias, traded for no single token dominating a step
        advantages_BT = advantages_BT.clamp(min=-advantage_clip, max=advantage_clip)

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


BaselineMode = Literal["none", "auto", "topk", "batch"]


class SampledReverseKLConfig(BaseModel):
    """``learner.loss`` for the sampled-token reverse KL (the loss when the teacher sends no top-k)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sampled_reverse_kl"] = "sampled_reverse_kl"
    is_cap: float = Field(2.0, ge=1.0, description="Truncated importance sampling: cap on pi_theta/pi_behaviour.")
    baseline: BaselineMode = Field(
        "auto", description="Control variate subtracted from the advantage (learner/losses/baselines.py): topk = "
        "-KL(pi || teacher) per position on the teacher's top-k (exact E[A] when topk = vocabulary), batch = "
        "leave-one-out mean advantage of the other rows, auto = topk when the teacher sends top-k else batch, "
        "none = the TML OPD post's estimator (unstable: docs/experiments.md, 'Loss stability').")
    advantage_clip: float | None = Field(
        ADVANTAGE_CLIP_DEFAULT, gt=0, description="Bound c on |advantage - baseline| (a bias that keeps one token "
        "the teacher finds very unlikely from dominating a step); null: unbounded.")

    needs_teacher_topk: ClassVar[bool] = False

    def build(self) -> SampledReverseKL:
        return SampledReverseKL(is_cap=self.is_cap, baseline=self.baseline, advantage_clip=self.advantage_clip)


class SampledReverseKL:
    """The built loss: log pi of the sampled tokens from the student's logits, a baseline, then the TIS loss."""

    def __init__(self, *, is_cap: float, baseline: BaselineMode = "none", advantage_clip: float | None = None) -> None:
        self.is_cap = is_cap
        self.baseline = baseline
        self.advantage_clip = advantage_clip

    def __call__(
        self, batch: Batch, logits_BTV: torch.Tensor, *, weights_BT: torch.Tensor | None, normalizer: float
    ) -> LossOutput:
        from learner.batching import policy_logprobs
        from learner.losses.baselines import batch_baseline

        # log pi under each row's sampling transform (temperature, top-p), the distribution mu sampled from
        logprobs_BT = policy_logprobs(batch, logits_BTV)
        return sampled_reverse_kl_loss(
            logprobs_BT, batch.behaviour_logprobs_BT, batch.teacher_logprobs_BT, batch.response_mask_BT,
            is_cap=self.is_cap, weights_BT=weights_BT, normalizer=normalizer,
            baseline_BT=batch_baseline(batch, logits_BTV, self.baseline), advantage_clip=self.advantage_clip,
        )
