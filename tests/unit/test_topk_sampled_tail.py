"""`topk_sampled_tail` (learner/losses/topk_sampled_tail.py): its docstring's claims, by enumeration in float64.

- The expected gradient over the sampled token is the full-vocabulary reverse KL's, which the bucket loss's is
  not: on policy, and off policy through the importance weight (no cap);
- its `reverse_kl` is, in expectation, the full-vocabulary reverse KL;
- with K = V (every token in the top-k) it is `topk_kl`'s loss, value and gradient;
- `learner.loss: topk_sampled_tail` builds it, and it needs the teacher's top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses.topk_kl import topk_kl_loss
from learner.losses.topk_sampled_tail import topk_sampled_tail_loss

V, K = 7, 2


def _setup(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits_V = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    logp_V = (torch.randn(V, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    top_lp, top_ids = logp_V.topk(K)
    return logits_V, logp_V, top_ids, top_lp


def _estimate(logits_V: torch.Tensor, logp_V: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor, y: int,
              behaviour: float, is_cap: float = math.inf) -> tuple[torch.Tensor, float]:
    """(gradient over the logits, reverse_kl) of the loss for one position whose sampled token is y."""
    x = logits_V.clone().requires_grad_(True)
    out = topk_sampled_tail_loss(x.view(1, 1, V), torch.tensor([[y]]), torch.tensor([[behaviour]], dtype=torch.float64),
                                 logp_V[y].view(1, 1), top_ids.view(1, 1, -1), top_lp.view(1, 1, -1),
                                 torch.ones(1, 1, dtype=torch.bool), is_cap=is_cap)
    (grad,) = torch.autograd.grad(out.loss, x)
    return grad, float(out.reverse_kl)


def _exact(logits_V: torch.Tensor, logp_V: torch.Tensor) -> tuple[torch.Tensor, float]:
    x = logits_V.clone().requires_grad_(True)
    logq = x.log_softmax(-1)
    kl = (logq.exp() * (logq - logp_V)).sum()
    (grad,) = torch.autograd.grad(kl, x)
    return grad, float(kl.detach())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_policy_its_expected_gradient_and_value_are_the_full_reverse_kls(seed: int) -> None:
    logits_V, logp_V, top_ids, top_lp = _setup(seed)
    q_V = logits_V.softmax(-1)
    grads, values = zip(*[_estimate(logits_V, logp_V, top_ids, top_lp, y, float(q_V[y].log())) for y in range(V)],
                        strict=True)
    expected_grad = sum(q_V[y] * grads[y] for y in range(V))
    expected_value = sum(float(q_V[y]) * values[y] for y in range(V))
    exact_grad, exact_value = _exact(logits_V, logp_V)
    torch.testing.assert_close(expected_grad, exact_grad, rtol=1e-9, atol=1e-12)
    assert expected_value == pytest.approx(exact_value, rel=1e-9)
    # the bucket loss alone is biased: the correction is what makes the difference
    x = logits_V.clone().requires_grad_(True)
    bucket = topk_kl_loss(x.view(1, 1, V), top_ids.view(1, 1, -1), top_lp.view(1, 1, -1),
                          torch.ones(1, 1, dtype=torch.bool), direction="reverse")
    (bucket_grad,) = torch.autograd.grad(bucket.loss, x)
    assert (bucket_grad - exact_grad).abs().max() > 1e-3


def test_off_policy_the_importance_weight_keeps_it_unbiased() -> None:
    logits_V, logp_V, top_ids, top_lp = _setup(3)
    mu_V = (logits_V * 0.5).softmax(-1)  # an older, flatter behaviour policy drew the token
    grads = [_estimate(logits_V, logp_V, top_ids, top_lp, y, float(mu_V[y].log()))[0] for y in range(V)]
    expected_grad = sum(mu_V[y] * grads[y] for y in range(V))
    torch.testing.assert_close(expected_grad, _exact(logits_V, logp_V)[0], rtol=1e-9, atol=1e-12)


def test_with_the_whole_vocabulary_in_the_top_k_it_is_topk_kl() -> None:
    g = torch.Generator().manual_seed(4)
    B, T = 2, 5
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    logp = torch.randn(B, T, V, generator=g, dtype=torch.float64).log_softmax(-1)
    top_lp, top_ids = logp.topk(V, dim=-1)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    a = logits.clone().requires_grad_(True)
    out = topk_sampled_tail_loss(a, y, torch.full((B, T), -1.0, dtype=torch.float64), logp.gather(-1, y[..., None])[..., 0],
                                 top_ids, top_lp, mask, is_cap=2.0)
    b = logits.clone().requires_grad_(True)
    ref = topk_kl_loss(b, top_ids, top_lp, mask, direction="reverse")
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.reverse_kl, ref.reverse_kl)
    torch.testing.assert_close(torch.autograd.grad(out.loss, a)[0], torch.autograd.grad(ref.loss, b)[0])


def test_bad_inputs_name_the_argument() -> None:
    logits_V, logp_V, top_ids, top_lp = _setup(0)
    with pytest.raises(ValueError, match="is_cap"):
        _estimate(logits_V, logp_V, top_ids, top_lp, 0, -1.0, is_cap=0)
    with pytest.raises(ValueError, match="sampled_ids_BT"):
        topk_sampled_tail_loss(logits_V.view(1, 1, V), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1),
                               torch.zeros(1, 1), top_ids.view(1, 1, -1), top_lp.view(1, 1, -1),
                               torch.ones(1, 1, dtype=torch.bool), is_cap=2.0)


def test_the_config_builds_it_and_needs_the_teachers_top_k() -> None:
    from opd.config import ConfigError, OPDConfig

    cfg = OPDConfig.model_validate({"learner": {"loss": "topk_sampled_tail"}, "teacher": {"topk": 8}})
    assert cfg.learner.loss.kind == "topk_sampled_tail" and cfg.learner.loss.build().is_cap == 2.0
    with pytest.raises((ConfigError, ValueError), match="topk"):
        OPDConfig.model_validate({"learner": {"loss": {"kind": "topk_sampled_tail"}}, "teacher": {"topk": 0}})
