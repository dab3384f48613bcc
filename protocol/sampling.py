"""The sampling transform, defined once: which distribution a rollout token is drawn from.

WHY one definition for both sides: the learner's importance ratio ``pi(y) / mu(y)`` compares the
behaviour log-prob the actor recorded with the log-prob the learner recomputes. Both must be of the
*same* distribution, the one the token was actually drawn from::

    z          = logits / temperature
    nucleus    = the most likely tokens whose mass before them is < top_p  (top_p = 1: every token)
    log pi(y)  = z_y - logsumexp_{v in nucleus} z_v          (log_softmax(z), renormalised on the nucleus)

The actor (``actors/engines/hf.py``) samples from ``sampling_logprobs`` and records the sampled token's
entry; the learner (``learner/batching.py``) recomputes ``token_logprobs`` at the sampling parameters
carried by each rollout (``RolloutPrefix.temperature`` / ``top_p``). At the same weights the two agree
to float rounding, so the on-policy ratio is 1.

Nucleus rule: sort by probability, keep a token while the mass strictly before it is < top_p (the
most likely token is always kept), then keep every token whose scaled logit ties the last kept one,
so membership is a threshold on ``z`` and does not depend on how a sort breaks ties.

Gradient (learner): membership is decided on the detached current logits (a set has no gradient); the
renormalisation ``logsumexp`` over the nucleus is differentiable, so ``grad log pi(y)`` is the
gradient of the truncated, renormalised distribution.

A sampled token outside the learner's current nucleus (the policy moved since sampling, or float
rounding flipped the marginal token): its exact ``pi(y)`` is 0, so ``log pi = -inf``, the ratio is 0
and the loss ``-w * A * log pi`` is ``0 * inf = NaN``. Instead the learner's nucleus is extended by
that one token (``nucleus | {y}``): finite, differentiable, equal to the exact value whenever ``y`` is
inside, and close to it at the boundary (the marginal token carries little mass). The token then
still trains with a ratio that reflects how much less likely the learner now finds it.
"""

from __future__ import annotations

import math

import torch


def check_sampling_params(temperature: float, top_p: float, *, where: str = "") -> None:
    """Raise ``ValueError`` naming the parameter unless ``temperature > 0`` and ``0 < top_p <= 1``."""
    prefix = f"{where}." if where else ""
    if isinstance(temperature, bool) or not (isinstance(temperature, int | float) and math.isfinite(temperature)
                                             and temperature > 0):
        raise ValueError(f"{prefix}temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(top_p, bool) or not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"{prefix}top_p must be in (0, 1], got {top_p!r}")


def _per_row(name: str, value: float | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or a length-``n`` tensor as an ``[n, 1]`` column in ``like``'s dtype and device."""
    column = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if column.dim() == 0:
        column = column.expand(n)
    if tuple(column.shape) != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {tuple(column.shape)}")
    return column[:, None]


def nucleus_threshold(z_NV: torch.Tensor, top_p_N1: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest scaled logit inside the top-p nucleus (``-inf`` where top_p >= 1); detached."""
    with torch.no_grad():
        threshold_N1 = torch.full_like(z_NV[:, :1], float("-inf"))
        rows_R = (top_p_N1[:, 0] < 1).nonzero().squeeze(1)
        if rows_R.numel():
            sorted_RV = z_NV[rows_R].sort(dim=-1, descending=True).values
            probs_RV = torch.softmax(sorted_RV, dim=-1)
            before_RV = probs_RV.cumsum(dim=-1) - probs_RV  # mass strictly before each token
            kept_R1 = (before_RV < top_p_N1[rows_R]).sum(dim=-1, keepdim=True).clamp(min=1)
            threshold_N1[rows_R] = sorted_RV.gather(-1, kept_R1 - 1)
    return threshold_N1


def _scaled(logits_NV: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    if logits_NV.dim() != 2 or not logits_NV.is_floating_point():
        raise ValueError(f"logits_NV must be a 2-D float tensor, got {tuple(logits_NV.shape)} {logits_NV.dtype}")
    z_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))  # bf16 softmax is too coarse
    return z_NV / _per_row("temperature", temperature, z_NV.shape[0], z_NV)


def sampling_logprobs(
    logits_NV: torch.Tensor, temperature: float | torch.Tensor, top_p: float | torch.Tensor
) -> torch.Tensor:
    """The full log-distribution the actor samples from: ``-inf`` outside the nucleus, renormalised inside."""
    z_NV = _scaled(logits_NV, temperature)
    top_p_N1 = _per_row("top_p", top_p, z_NV.shape[0], z_NV)
    if bool((top_p_N1 < 1).any()):
        z_NV = z_NV.masked_fill(z_NV < nucleus_threshold(z_NV, top_p_N1), float("-inf"))
    return torch.log_softmax(z_NV, dim=-1)


def token_logprobs(
    logits_NV: torch.Tensor,
    tokens_N: torch.Tensor,
    temperature: float | torch.Tensor,
    top_p: float | torch.Tensor,
) -> torch.Tensor:
    """``log pi(tokens_N)`` under the sampling distribution, differentiable w.r.t. ``logits_NV``.

    ``temperature`` / ``top_p``: scalars or one value per row. A token outside the current nucleus is
    scored on ``nucleus | {token}`` (see the module docstring for why). Result dtype: at least float32.
    """
    z_NV = _scaled(logits_NV, temperature)
    top_p_N1 = _per_row("top_p", top_p, z_NV.shape[0], z_NV)
    tokens_N1 = tokens_N.long().reshape(-1, 1)
    if tokens_N1.shape[0] != z_NV.shape[0]:
        raise ValueError(f"tokens_N has {tokens_N1.shape[0]} entries for {z_NV.shape[0]} rows of logits")
    z_y_N = z_NV.gather(-1, tokens_N1).squeeze(1)
    if not bool((top_p_N1 < 1).any()):
        return z_y_N - z_NV.logsumexp(dim=-1)
    keep_NV = z_NV.detach() >= nucleus_threshold(z_NV, top_p_N1)
    keep_NV = keep_NV.scatter(-1, tokens_N1, True)
    return z_y_N - z_NV.masked_fill(~keep_NV, float("-inf")).logsumexp(dim=-1)
