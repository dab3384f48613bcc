"""Baselines of the sampled reverse KL (learner/losses/baselines.py) and the loss's baseline/clip options.

Behaviours pinned:
- topk_baseline is -KL(q || p) on the bucketed top-k support, per position, against a float64 loop
  reference; leave_one_out_baseline is the mean advantage of the other rows, against a loop reference.
- sampled_reverse_kl_loss with baseline_BT and advantage_clip matches a float64 loop reference.
- Unbiasedness: on a known categorical, the expected gradient (exact enumeration over tokens, and a
  seeded Monte Carlo average) of the loss with either baseline equals the exact reverse-KL gradient;
  the gradient's variance is lower with the baseline than without.
- The built loss (what the learner calls) computes each baseline on the aligned views; auto picks
  topk with top-k and batch without; topk on a batch without top-k raises naming the config key.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner.batching import Sample, collate, gather_response_logprobs
from learner.config import LearnerConfig
from learner.losses import sampled_reverse_kl_loss
from learner.losses.baselines import batch_baseline, leave_one_out_baseline, topk_baseline


def ref_sampled(logprobs, behaviour, teacher, mask, cap, baseline, clip):
    """Loss and d loss / d logprobs with a baseline and an advantage clip, by explicit loops (float64)."""
    B, T = logprobs.shape
    n = sum(1 for b in range(B) for t in range(T) if mask[b][t])
    total, grad = 0.0, np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            w = min(math.exp(logprobs[b][t] - behaviour[b][t]), cap)
            advantage = teacher[b][t] - behaviour[b][t] - baseline[b][t]
            if clip is not None:
                advantage = max(-clip, min(clip, advantage))
            total += -w * advantage * logprobs[b][t]
            grad[b][t] = -w * advantage / n
    return total / n, grad


@pytest.mark.parametrize("clip", [None, 0.7])
def test_sampled_loss_with_baseline_and_clip_matches_loop_reference(clip):
    g = torch.Generator().manual_seed(21)
    B, T = 3, 6
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    behaviour = logprobs.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    teacher = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    baseline = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    out = sampled_reverse_kl_loss(logprobs, behaviour, teacher, mask, is_cap=1.5, baseline_BT=baseline,
                                  advantage_clip=clip)
    out.loss.backward()
    ref_loss, ref_grad = ref_sampled(logprobs.detach().numpy(), behaviour.numpy(), teacher.numpy(), mask.numpy(),
                                     1.5, baseline.numpy(), clip)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(logprobs.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-12)
    # the reverse-KL statistic is the plain sampled estimate, whatever the baseline
    assert out.reverse_kl.item() == pytest.approx(float((behaviour - teacher)[mask].mean()), rel=1e-12)


def test_zero_baseline_and_no_clip_is_the_old_estimator():
    g = torch.Generator().manual_seed(22)
    logprobs = -torch.rand(2, 5, generator=g, dtype=torch.float64) * 3
    behaviour, teacher = logprobs + 0.1, -torch.rand(2, 5, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(2, 5, dtype=torch.bool)
    old = sampled_reverse_kl_loss(logprobs, behaviour, teacher, mask, is_cap=2.0)
    new = sampled_reverse_kl_loss(logprobs, behaviour, teacher, mask, is_cap=2.0, baseline_BT=torch.zeros(2, 5,
                                  dtype=torch.float64))
    assert new.loss.item() == old.loss.item()


def test_topk_baseline_is_minus_bucketed_reverse_kl():
    g = torch.Generator().manual_seed(23)
    B, T, V, K = 2, 4, 9, 3
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher_full = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, dim=-1)
    top = teacher_full.topk(K, dim=-1)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    baseline = topk_baseline(logits, top.indices, top.values, mask)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                assert baseline[b, t].item() == 0.0
                continue
            q = torch.softmax(logits[b, t], -1).tolist()
            ids = top.indices[b, t].tolist()
            p_s = [math.exp(x) for x in top.values[b, t].tolist()] + [1 - sum(math.exp(x) for x in top.values[b, t].tolist())]
            q_s = [q[i] for i in ids] + [sum(q[j] for j in range(V) if j not in ids)]
            ref = -sum(qi * math.log(qi / pi) for qi, pi in zip(q_s, p_s, strict=True))
            assert baseline[b, t].item() == pytest.approx(ref, rel=1e-10)
    assert not baseline.requires_grad


def test_leave_one_out_baseline_is_the_other_rows_mean():
    advantages = torch.tensor([[1.0, 2.0, 9.0], [-3.0, 0.0, 0.0], [5.0, 7.0, 11.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    baseline = leave_one_out_baseline(advantages, mask)
    row_means = [(-3 + 5 + 7 + 11) / 4, (1 + 2 + 5 + 7 + 11) / 5, (1 + 2 - 3) / 3]
    expected = torch.tensor([[row_means[0]] * 2 + [0.0], [row_means[1], 0.0, 0.0], [row_means[2]] * 3], dtype=torch.float64)
    torch.testing.assert_close(baseline, expected)
    alone = leave_one_out_baseline(advantages[:1], mask[:1])  # one row: nothing independent to average
    assert torch.equal(alone, torch.zeros_like(alone))


# ---------------------------------------------------------------------------------------------------
# unbiasedness and variance on a known categorical


def _categorical(seed: int = 24, V: int = 6):
    """Student logits (a leaf) and a teacher that disagrees with it, both float64 over V tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(V, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2.5, dim=-1)
    return logits, teacher


def _exact_reverse_kl_grad(logits, teacher):
    logq = torch.log_softmax(logits, -1)
    (grad,) = torch.autograd.grad((logq.exp() * (logq - teacher)).sum(), logits)
    return grad


def _per_token_grads(logits, teacher, tokens, baseline):
    """d loss / d logits of the loss on a batch of one-token rows (one row per sampled token), on policy.

    ``baseline``: "none", "topk" (K = V: the exact E[A]) or "batch" (leave-one-out over the rows).
    Returns the gradient of the token-mean loss (the average of the per-token gradients).
    """
    N = tokens.shape[0]
    logq = torch.log_softmax(logits, -1)
    logprobs = logq[tokens][:, None]  # [N, 1]
    behaviour, teacher_lp = logprobs.detach(), teacher[tokens][:, None]
    mask = torch.ones(N, 1, dtype=torch.bool)
    if baseline == "topk":
        ids = torch.arange(logits.shape[0]).expand(N, 1, -1)
        b = topk_baseline(logits.detach().expand(N, 1, -1), ids, teacher.expand(N, 1, -1), mask)
    elif baseline == "batch":
        b = leave_one_out_baseline(teacher_lp - behaviour, mask)
    else:
        b = None
    loss = sampled_reverse_kl_loss(logprobs, behaviour, teacher_lp, mask, is_cap=math.inf, baseline_BT=b).loss
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def test_topk_baseline_expected_gradient_is_exact_and_variance_is_lower():
    """Enumerate the sampled token: E_y[g(y)] equals the exact reverse-KL gradient with and without the
    per-position baseline (to float64 rounding), and E||g - E g||^2 drops with it."""
    logits, teacher = _categorical()
    exact = _exact_reverse_kl_grad(logits, teacher)
    pi = torch.softmax(logits.detach(), -1)
    variance = {}
    for baseline in ("none", "topk"):
        per_y = torch.stack([_per_token_grads(logits, teacher, torch.tensor([y]), baseline) for y in range(len(pi))])
        mean = (pi[:, None] * per_y).sum(0)
        torch.testing.assert_close(mean, exact, rtol=1e-10, atol=1e-12)
        variance[baseline] = float((pi * ((per_y - mean) ** 2).sum(-1)).sum())
    assert variance["topk"] < 0.9 * variance["none"], variance


@pytest.mark.parametrize("baseline", ["none", "topk", "batch"])
def test_monte_carlo_average_of_the_gradient_is_the_exact_gradient(baseline):
    """Many seeded samples from the categorical, in groups of 8 rows (a learner batch): the average
    gradient is within 5 standard errors of the exact gradient in every coordinate."""
    logits, teacher = _categorical()
    exact = _exact_reverse_kl_grad(logits, teacher)
    g = torch.Generator().manual_seed(25)
    groups = 2000
    tokens = torch.multinomial(torch.softmax(logits.detach(), -1), groups * 8, replacement=True, generator=g)
    grads = torch.stack([_per_token_grads(logits, teacher, tokens[i * 8:(i + 1) * 8], baseline) for i in range(groups)])
    stderr = grads.std(0) / math.sqrt(groups)
    assert bool(((grads.mean(0) - exact).abs() <= 5 * stderr + 1e-12).all()), (grads.mean(0), exact, stderr)


def test_baselines_lower_the_variance_of_a_batch_gradient():
    """Seeded groups of 8 on-policy tokens: mean squared error of the batch gradient against the exact one
    is lower with the leave-one-out baseline than without, and lower still with the per-position one."""
    logits, teacher = _categorical()
    exact = _exact_reverse_kl_grad(logits, teacher)
    g = torch.Generator().manual_seed(26)
    groups = 1000
    tokens = torch.multinomial(torch.softmax(logits.detach(), -1), groups * 8, replacement=True, generator=g)
    mse = {}
    for baseline in ("none", "batch", "topk"):
        errs = [float(((_per_token_grads(logits, teacher, tokens[i * 8:(i + 1) * 8], baseline) - exact) ** 2).sum())
                for i in range(groups)]
        mse[baseline] = sum(errs) / groups
    assert mse["batch"] < 0.9 * mse["none"], mse
    assert mse["topk"] < mse["batch"], mse


# ---------------------------------------------------------------------------------------------------
# the built loss


def _batch(K: int, V: int = 7, seed: int = 27):
    rng = np.random.default_rng(seed)
    samples = []
    for R in (4, 3, 5):
        full_RV = np.log(rng.dirichlet(np.ones(V), size=R))
        ids_RK = np.argsort(-full_RV, axis=-1)[:, :K]
        samples.append(Sample(
            prompt_ids=rng.integers(0, V, 2), response_ids=rng.integers(0, V, R),
            behaviour_logprobs=-rng.random(R).astype(np.float32), teacher_logprobs=-3 * rng.random(R).astype(np.float32),
            topk_ids=ids_RK.astype(np.int32), topk_logprobs=np.take_along_axis(full_RV, ids_RK, -1).astype(np.float32),
            policy_version=0, temperature=0.8,
        ))
    batch = collate(samples, pad_id=0)
    return batch, torch.from_numpy(rng.standard_normal((*batch.input_ids_BT.shape, V)))


@pytest.mark.parametrize(("mode", "K", "expected_kind"), [("topk", 3, "topk"), ("auto", 3, "topk"), ("auto", 0, "batch"),
                                                          ("batch", 3, "batch"), ("none", 3, "none")])
def test_built_loss_uses_the_configured_baseline_on_aligned_views(mode, K, expected_kind):
    batch, logits_BTV = _batch(K)
    cfg = LearnerConfig.model_validate({"loss": {"kind": "sampled_reverse_kl", "baseline": mode, "advantage_clip": 2.0}})
    out = cfg.loss.build()(batch, logits_BTV, weights_BT=None, normalizer=9.0)
    mask = batch.response_mask_BT
    if expected_kind == "topk":
        expected_b = torch.zeros(mask.shape, dtype=torch.float64)
        temperature_B11 = batch.temperature_B.double()[:, None, None]  # 0.8 as the batch stores it (float32)
        expected_b[:, 1:] = topk_baseline(logits_BTV[:, :-1] / temperature_B11, batch.topk_ids_BTK[:, 1:], batch.topk_logprobs_BTK[:, 1:],
                                          mask[:, 1:])
    elif expected_kind == "batch":
        expected_b = leave_one_out_baseline(batch.teacher_logprobs_BT - batch.behaviour_logprobs_BT, mask)
    else:
        expected_b = None
    logprobs = gather_response_logprobs(logits_BTV, batch.input_ids_BT, temperature=batch.temperature_B,
                                        mask_BT=mask)
    reference = sampled_reverse_kl_loss(logprobs, batch.behaviour_logprobs_BT, batch.teacher_logprobs_BT, mask,
                                        is_cap=2.0, normalizer=9.0, baseline_BT=expected_b, advantage_clip=2.0)
    torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=1e-12)
    if expected_b is not None:
        assert not torch.equal(expected_b, torch.zeros_like(expected_b))


def test_topk_baseline_without_top_k_names_the_key():
    batch, logits_BTV = _batch(0)
    loss = LearnerConfig.model_validate({"loss": {"kind": "sampled_reverse_kl", "baseline": "topk"}}).loss.build()
    with pytest.raises(ValueError, match=r"baseline=topk needs teacher top-k: set teacher\.topk > 0"):
        loss(batch, logits_BTV, weights_BT=None, normalizer=1.0)
    with pytest.raises(ValueError, match="must be none, auto, topk or batch"):
        batch_baseline(batch, logits_BTV, "mean")


def test_bad_baseline_options_raise():
    lp = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="baseline_BT has shape"):
        sampled_reverse_kl_loss(lp, lp, lp, mask, is_cap=2.0, baseline_BT=torch.zeros(2, 4))
    for clip in (0.0, -1.0, True):
        with pytest.raises(ValueError, match="advantage_clip must be None or a positive number"):
            sampled_reverse_kl_loss(lp, lp, lp, mask, is_cap=2.0, advantage_clip=clip)
    with pytest.raises(ValueError, match="advantage_clip"):
        LearnerConfig.model_validate({"loss": {"kind": "sampled_reverse_kl", "advantage_clip": 0}})
