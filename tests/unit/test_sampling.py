"""Tests for protocol/sampling.py, the one definition of the sampling transform.

Behaviours pinned:
- sampling_logprobs is log_softmax(logits / T) at top_p = 1; under top_p < 1 it is renormalised on the
  smallest most-likely set whose mass reaches top_p (-inf outside), ties at the boundary all kept;
- token_logprobs equals sampling_logprobs at the given tokens, per row with per-row T and top_p;
- its gradient: nucleus membership is a constant, the renormalisation is differentiable;
- a token outside the current nucleus gets a finite log-prob on nucleus | {token}, with a finite gradient;
- check_sampling_params names the bad parameter.
"""

from __future__ import annotations

import math

import pytest
import torch

from protocol.sampling import check_sampling_params, nucleus_threshold, sampling_logprobs, token_logprobs


def test_full_vocabulary_is_log_softmax_at_temperature() -> None:
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    for t in (1.0, 0.7, 1.5):
        torch.testing.assert_close(sampling_logprobs(logits, t, 1.0), torch.log_softmax(logits / t, -1))


def test_nucleus_is_the_smallest_most_likely_set_reaching_top_p() -> None:
    probs = torch.tensor([[0.5, 0.0625, 0.25, 0.125, 0.0625]])
    logp = sampling_logprobs(probs.log(), 1.0, 0.7)  # 0.5 + 0.25 reaches 0.7: {0, 2}
    assert torch.isinf(logp[0, [1, 3, 4]]).all()
    torch.testing.assert_close(logp[0, [0, 2]].exp(), torch.tensor([0.5, 0.25]) / 0.75)
    logp = sampling_logprobs(probs.log(), 1.0, 0.76)  # needs the 0.125 too
    assert torch.isfinite(logp[0, [0, 2, 3]]).all() and torch.isinf(logp[0, [1, 4]]).all()
    logp = sampling_logprobs(probs.log(), 1.0, 1e-9)  # the most likely token always stays
    assert logp[0, 0].item() == 0.0


def test_ties_at_the_boundary_are_all_kept() -> None:
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    logp = sampling_logprobs(logits, 1.0, 0.7)  # the first 1.0 crosses 0.7; its twin is kept with it
    assert torch.isfinite(logp[0, :3]).all() and torch.isinf(logp[0, 3])
    assert nucleus_threshold(logits, torch.tensor([[0.7]])).item() == 1.0


def test_token_logprobs_match_the_sampled_distribution_per_row() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 40, generator=g, dtype=torch.float64) * 3
    temperature = torch.tensor([1.0, 0.7, 0.7, 1.3, 1.0, 0.5], dtype=torch.float64)
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.9, 0.5, 0.95], dtype=torch.float64)
    reference = torch.stack([sampling_logprobs(logits[i : i + 1], temperature[i].item(), top_p[i].item())[0]
                             for i in range(6)])
    tokens = reference.argmax(-1)  # in every nucleus
    out = token_logprobs(logits, tokens, temperature, top_p)
    torch.testing.assert_close(out, reference.gather(-1, tokens[:, None]).squeeze(1))
    assert out.dtype == torch.float64
    assert token_logprobs(logits.float(), tokens, 0.7, 1.0).dtype == torch.float32


def test_gradient_treats_membership_as_constant_and_renormalises() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.5, -1.0, -2.0]], requires_grad=True)
    token = torch.tensor([1])
    token_logprobs(logits, token, 0.8, 0.9).sum().backward()
    kept = sampling_logprobs(logits.detach(), 0.8, 0.9).isfinite()[0]
    ref_logits = logits.detach().clone().requires_grad_(True)
    z = ref_logits[0] / 0.8
    (z[1] - z[kept].logsumexp(0)).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    assert logits.grad[0, ~kept].abs().sum() == 0  # tokens outside the nucleus: no gradient


def test_token_outside_the_nucleus_is_finite_on_the_extended_nucleus() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.5, -1.0, -2.0]], requires_grad=True)
    outside = torch.tensor([3])
    assert torch.isinf(sampling_logprobs(logits.detach(), 1.0, 0.9)[0, 3])  # exact pi(y) would be 0
    out = token_logprobs(logits, outside, 1.0, 0.9)
    z = logits.detach()[0]
    kept = sampling_logprobs(logits.detach(), 1.0, 0.9).isfinite()[0]
    kept[3] = True
    assert out.item() == pytest.approx((z[3] - z[kept].logsumexp(0)).item(), abs=1e-6)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 3] > 0
    # below the full-vocabulary value would be impossible: the extended nucleus has less mass
    assert out.item() >= torch.log_softmax(z, 0)[3].item()


def test_bf16_logits_are_upcast() -> None:
    logits = torch.randn(2, 9).bfloat16()
    out = token_logprobs(logits, torch.tensor([0, 1]), 0.7, 0.9)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(("temperature", "top_p", "match"), [
    (0.0, 1.0, "temperature"), (-1.0, 1.0, "temperature"), (math.inf, 1.0, "temperature"), (True, 1.0, "temperature"),
    (1.0, 0.0, "top_p"), (1.0, 1.5, "top_p"), (1.0, math.nan, "top_p"),
])
def test_check_sampling_params_names_the_parameter(temperature: float, top_p: float, match: str) -> None:
    with pytest.raises(ValueError, match=f"actor.{match}"):
        check_sampling_params(temperature, top_p, where="actor")


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="top_p must be a scalar or have shape"):
        token_logprobs(torch.zeros(2, 3), torch.tensor([0, 1]), 1.0, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="tokens_N has 1 entries"):
        token_logprobs(torch.zeros(2, 3), torch.tensor([0]), 1.0, 1.0)
