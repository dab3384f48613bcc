"""Tests for the learner/losses/ package (one file per loss, the union in __init__.py).

Behaviours pinned:
- opd_advantages is log p_T - log mu (minus the sampled reverse KL), detached.
- sampled_reverse_kl_loss: a hand-computed example (loss, gradient, every stat); agreement with an
  independent float64 loop reference on random inputs (with weights and truncation); the gradient is
  -min(ratio, cap) * A / N per token and, untruncated, equals the gradient of Tinker's -ratio * A;
  garbage (NaN/inf) at masked positions never reaches the loss or the gradient; a global
  ``normalizer`` makes microbatch losses add up to the full-batch loss; zero masked tokens gives a
  finite zero loss that still backpropagates.
- topk_kl_loss, both directions x both tails, against a per-position numpy reference; with K = V both
  tails equal the exact full-vocabulary KL; gradients match finite differences (gradcheck); the
  reverse_kl stat is the restricted-support KL(q || p).
- gkd_jsd_loss against a numpy implementation of TRL's generalized JSD on the full vocabulary; its
  endpoints (beta 0 / 1) equal forward / reverse topk_kl; compared with TRL itself when installed.
- position_weights and horizon_discount against loop references.
- bad inputs (shapes, ranks, dtypes, ids, corrupt teacher records, hyperparameters) raise ValueError.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner.batching import Batch, Sample, collate, gather_response_logprobs
from learner.config import LearnerConfig
from learner.losses import (
    gkd_jsd_loss,
    horizon_discount,
    opd_advantages,
    position_weights,
    sampled_reverse_kl_loss,
    topk_kl_loss,
)

# ---------------------------------------------------------------------------------------------------
# independent numpy references (plain loops, float64)


def ref_sampled(logprobs, behaviour, teacher, mask, cap, weights=None):
    """Loss and d loss / d logprobs for the truncated-IS REINFORCE loss, by explicit loops."""
    B, T = logprobs.shape
    n = sum(1 for b in range(B) for t in range(T) if mask[b][t])
    total, grad = 0.0, np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            ratio = math.exp(logprobs[b][t] - behaviour[b][t])
            w = ratio if ratio < cap else cap
            advantage = teacher[b][t] - behaviour[b][t]
            weight = 1.0 if weights is None else weights[b][t]
            total += -w * advantage * logprobs[b][t] * weight
            grad[b][t] = -w * advantage * weight / max(n, 1)
    return total / max(n, 1), grad


def ref_softmax(logits):
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    z = sum(exps)
    return [e / z for e in exps]


def ref_support(student_logits_V, ids_K, teacher_logprobs_K, tail):
    """(p, q) teacher/student distributions on the support, from first principles."""
    q_full = ref_softmax(list(student_logits_V))
    q = [q_full[i] for i in ids_K]
    p = [math.exp(x) for x in teacher_logprobs_K]
    if tail == "renormalize":
        return [x / sum(p) for x in p], [x / sum(q) for x in q]
    q_tail = sum(q_full[j] for j in range(len(q_full)) if j not in set(ids_K))
    p_tail = max(0.0, 1.0 - sum(p))
    return [*p, p_tail], [*q, q_tail]


def ref_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def ref_gjsd(p, q, beta):
    """TRL's generalized JSD: beta=0 forward KL(p||q), beta=1 reverse KL(q||p), else mixture form."""
    if beta == 0:
        return ref_kl(p, q)
    if beta == 1:
        return ref_kl(q, p)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def ref_topk_loss(logits, ids, tlp, mask, divergence):
    B, T, _ = logits.shape
    values = [divergence(b, t) for b in range(B) for t in range(T) if mask[b][t]]
    return sum(values) / max(len(values), 1)


def make_topk_inputs(B=2, T=5, V=11, K=4, seed=0, dtype=torch.float64):
    """Student logits plus a real teacher's top-k (sorted, summing to < 1) and a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher_full = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, dim=-1)
    topk = teacher_full.topk(K, dim=-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 0] = False
    mask[-1, -2:] = False
    return student.to(dtype), topk.indices, topk.values.to(dtype), mask, teacher_full


# ---------------------------------------------------------------------------------------------------
# sampled reverse KL


def test_opd_advantages_is_teacher_minus_behaviour_and_detached():
    behaviour = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0]], requires_grad=True)
    advantages = opd_advantages(behaviour, teacher)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, -1.0]]))
    assert not advantages.requires_grad


def test_sampled_reverse_kl_hand_computed_example():
    # token 0: ratio 1, A = -1 - (-0.5)... = 0.5, loss_t = -(1 * 0.5 * -1.0) = 0.5
    # token 1: ratio exp(log 4) = 4 -> truncated to 2, A = -3 - (-2 - log 4) = log 4 - 1,
    #          loss_t = -(2 * (log 4 - 1) * -2.0) = 4 (log 4 - 1)
    # token 2: masked out
    log4 = math.log(4.0)
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    behaviour = torch.tensor([[-1.0, -2.0 - log4, -0.7]], dtype=torch.float64)
    teacher = torch.tensor([[-0.5, -3.0, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    out = sampled_reverse_kl_loss(logprobs, behaviour, teacher, mask, is_cap=2.0)
    expected_loss = (0.5 + 4 * (log4 - 1)) / 2
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-12)
    out.loss.backward()
    expected_grad = [[-(1 * 0.5) / 2, -(2 * (log4 - 1)) / 2, 0.0]]
    torch.testing.assert_close(logprobs.grad, torch.tensor(expected_grad, dtype=torch.float64))
    assert out.reverse_kl.item() == pytest.approx(((-1 + 0.5) + (-2 - log4 + 3)) / 2, abs=1e-12)
    assert out.ratio_mean.item() == pytest.approx(2.5)
    assert out.ratio_max.item() == pytest.approx(4.0)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    assert out.tokens.item() == 2


@pytest.mark.parametrize("cap", [0.8, 1.5, math.inf])
@pytest.mark.parametrize("with_weights", [False, True])
def test_sampled_reverse_kl_matches_loop_reference(cap, with_weights):
    g = torch.Generator().manual_seed(1)
    B, T = 3, 7
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    behaviour = logprobs.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    teacher = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    mask = torch.rand(B, T, generator=g) > 0.3
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5 if with_weights else None
    out = sampled_reverse_kl_loss(logprobs, behaviour, teacher, mask, is_cap=cap, weights_BT=weights)
    out.loss.backward()
    ref_loss, ref_grad = ref_sampled(
        logprobs.detach().numpy(), behaviour.numpy(), teacher.numpy(), mask.numpy(), cap,
        None if weights is None else weights.numpy(),
    )
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(logprobs.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-12)


def test_untruncated_gradient_equals_tinker_importance_sampling_gradient():
    """With no truncation, grad of -w.detach() * A * log pi == grad of -(pi / mu) * A (ratio with grad)."""
    g = torch.Generator().manual_seed(2)
    logprobs = (-torch.rand(2, 6, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    behaviour = logprobs.detach() + torch.randn(2, 6, generator=g, dtype=torch.float64) * 0.3
    teacher = -torch.rand(2, 6, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(2, 6, dtype=torch.bool)
    sampled_reverse_kl_loss(logprobs, behaviour, teacher, mask, is_cap=math.inf).loss.backward()
    ours = logprobs.grad.clone()
    logprobs.grad = None
    ratio = torch.exp(logprobs - behaviour)
    (-(ratio * (teacher - behaviour)).sum() / mask.sum()).backward()
    torch.testing.assert_close(ours, logprobs.grad)


def test_sampled_reverse_kl_float32_matches_float64():
    g = torch.Generator().manual_seed(3)
    lp64 = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 3
    beh64 = lp64 + torch.randn(4, 9, generator=g, dtype=torch.float64) * 0.2
    tea64 = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(4, 9, dtype=torch.bool)
    out64 = sampled_reverse_kl_loss(lp64, beh64, tea64, mask, is_cap=2.0)
    out32 = sampled_reverse_kl_loss(lp64.float(), beh64.float(), tea64.float(), mask, is_cap=2.0)
    assert out32.loss.dtype == torch.float32
    assert out32.loss.item() == pytest.approx(out64.loss.item(), rel=1e-5)


def test_masked_garbage_never_leaks_into_loss_or_gradient():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0, 0.0]], requires_grad=True)
    behaviour = torch.tensor([[-1.1, -1.9, float("nan"), float("-inf")]])
    teacher = torch.tensor([[-0.5, -2.5, float("inf"), float("nan")]])
    mask = torch.tensor([[1, 1, 0, 0]])  # numeric masks are accepted
    out = sampled_reverse_kl_loss(logprobs, behaviour, teacher, mask, is_cap=2.0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 2:].abs().sum() == 0
    clean = sampled_reverse_kl_loss(
        logprobs.detach()[:, :2], behaviour[:, :2], teacher[:, :2], mask[:, :2], is_cap=2.0
    )
    assert out.loss.item() == pytest.approx(clean.loss.item())
    for stat in ("reverse_kl", "ratio_mean", "ratio_max", "clip_fraction"):
        assert getattr(out, stat).item() == pytest.approx(getattr(clean, stat).item()), stat


def test_global_normalizer_makes_microbatches_sum_to_the_full_batch():
    g = torch.Generator().manual_seed(4)
    logprobs = -torch.rand(4, 6, generator=g) * 2
    behaviour = logprobs + torch.randn(4, 6, generator=g) * 0.3
    teacher = -torch.rand(4, 6, generator=g) * 3
    mask = torch.rand(4, 6, generator=g) > 0.4
    full = sampled_reverse_kl_loss(logprobs, behaviour, teacher, mask, is_cap=2.0).loss
    total_tokens = int(mask.sum())
    parts = [
        sampled_reverse_kl_loss(logprobs[s], behaviour[s], teacher[s], mask[s], is_cap=2.0,
                                normalizer=total_tokens).loss
        for s in (slice(0, 1), slice(1, 4))
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-6)


def test_no_masked_tokens_gives_zero_loss_that_still_backpropagates():
    logprobs = torch.full((2, 3), -1.0, requires_grad=True)
    zeros = torch.zeros(2, 3)
    out = sampled_reverse_kl_loss(logprobs, zeros, zeros, torch.zeros(2, 3, dtype=torch.bool), is_cap=2.0)
    assert out.loss.item() == 0.0 and out.tokens.item() == 0
    out.loss.backward()
    assert logprobs.grad is not None and logprobs.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------------
# top-k KL and GKD JSD


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_kl_matches_reference(direction, tail):
    logits, ids, tlp, mask, _ = make_topk_inputs(seed=5)
    out = topk_kl_loss(logits, ids, tlp, mask, direction=direction, tail=tail)

    def divergence(b, t):
        p, q = ref_support(logits[b, t].tolist(), ids[b, t].tolist(), tlp[b, t].tolist(), tail)
        return ref_kl(p, q) if direction == "forward" else ref_kl(q, p)

    def reverse(b, t):
        p, q = ref_support(logits[b, t].tolist(), ids[b, t].tolist(), tlp[b, t].tolist(), tail)
        return ref_kl(q, p)

    assert out.loss.item() == pytest.approx(ref_topk_loss(logits, ids, tlp, mask, divergence), rel=1e-9)
    assert out.reverse_kl.item() == pytest.approx(ref_topk_loss(logits, ids, tlp, mask, reverse), rel=1e-9)
    assert out.tokens.item() == int(mask.sum())
    assert out.ratio_mean is None and out.clip_fraction is None


def test_bucket_and_renormalize_differ_when_teacher_topk_misses_mass():
    logits, ids, tlp, mask, _ = make_topk_inputs(seed=6, K=2)
    bucket = topk_kl_loss(logits, ids, tlp, mask, direction="reverse", tail="bucket").loss
    renorm = topk_kl_loss(logits, ids, tlp, mask, direction="reverse", tail="renormalize").loss
    assert abs(bucket.item() - renorm.item()) > 1e-3


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_full_support_equals_exact_kl(tail, direction):
    V = 9
    logits, ids, tlp, mask, teacher_full = make_topk_inputs(seed=7, V=V, K=V)
    out = topk_kl_loss(logits, ids, tlp, mask, direction=direction, tail=tail)
    student_full = torch.log_softmax(logits, dim=-1)
    p, q = teacher_full.exp(), student_full.exp()
    if direction == "forward":
        kl = (p * (teacher_full - student_full)).sum(-1)
    else:
        kl = (q * (student_full - teacher_full)).sum(-1)
    expected = kl[mask].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_gkd_jsd_full_support_matches_trl_formula_reference(beta):
    V = 8
    logits, ids, tlp, mask, teacher_full = make_topk_inputs(seed=8, V=V, K=V)
    out = gkd_jsd_loss(logits, ids, tlp, mask, beta=beta, tail="renormalize")

    def divergence(b, t):
        q = ref_softmax(logits[b, t].tolist())
        p = [math.exp(x) for x in teacher_full[b, t].tolist()]
        return ref_gjsd(p, q, beta)

    assert out.loss.item() == pytest.approx(ref_topk_loss(logits, ids, tlp, mask, divergence), rel=1e-9)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_gkd_jsd_topk_matches_reference_and_endpoints(tail):
    logits, ids, tlp, mask, _ = make_topk_inputs(seed=9)
    for beta in (0.0, 0.25, 1.0):
        out = gkd_jsd_loss(logits, ids, tlp, mask, beta=beta, tail=tail)

        def divergence(b, t, beta=beta):
            p, q = ref_support(logits[b, t].tolist(), ids[b, t].tolist(), tlp[b, t].tolist(), tail)
            return ref_gjsd(p, q, beta)

        assert out.loss.item() == pytest.approx(ref_topk_loss(logits, ids, tlp, mask, divergence), rel=1e-9)
    forward = topk_kl_loss(logits, ids, tlp, mask, direction="forward", tail=tail).loss
    reverse = topk_kl_loss(logits, ids, tlp, mask, direction="reverse", tail=tail).loss
    assert gkd_jsd_loss(logits, ids, tlp, mask, beta=0.0, tail=tail).loss.item() == pytest.approx(forward.item())
    assert gkd_jsd_loss(logits, ids, tlp, mask, beta=1.0, tail=tail).loss.item() == pytest.approx(reverse.item())


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda *a: topk_kl_loss(*a, direction="forward", tail="bucket").loss,
        lambda *a: topk_kl_loss(*a, direction="reverse", tail="bucket").loss,
        lambda *a: topk_kl_loss(*a, direction="reverse", tail="renormalize").loss,
        lambda *a: gkd_jsd_loss(*a, beta=0.5, tail="bucket").loss,
    ],
    ids=["fwd-bucket", "rev-bucket", "rev-renorm", "jsd-bucket"],
)
def test_topk_gradients_match_finite_differences(loss_fn):
    logits, ids, tlp, mask, _ = make_topk_inputs(B=2, T=3, V=6, K=3, seed=10)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, ids, tlp, mask), (logits,), eps=1e-6, atol=1e-7)
    loss_fn(logits, ids, tlp, mask).backward()
    assert logits.grad[~mask].abs().sum() == 0  # no gradient to masked positions
    assert logits.grad[mask].abs().sum() > 0


def test_topk_float32_logits_are_close_to_float64():
    logits, ids, tlp, mask, _ = make_topk_inputs(seed=11)
    out64 = topk_kl_loss(logits, ids, tlp, mask, direction="reverse", tail="bucket")
    out32 = topk_kl_loss(logits.float(), ids, tlp.float(), mask, direction="reverse", tail="bucket")
    assert out32.loss.item() == pytest.approx(out64.loss.item(), rel=1e-4)


def test_topk_masked_garbage_is_ignored():
    logits, ids, tlp, mask, _ = make_topk_inputs(seed=12)
    dirty_ids, dirty_tlp = ids.clone(), tlp.clone()
    dirty_ids[~mask] = -7  # out of range, but masked
    dirty_tlp[~mask] = float("nan")
    clean = gkd_jsd_loss(logits, ids, tlp, mask, beta=0.5).loss
    dirty = gkd_jsd_loss(logits, dirty_ids, dirty_tlp, mask, beta=0.5).loss
    assert dirty.item() == pytest.approx(clean.item())


def _trl_generalized_jsd():
    """TRL's ``GKDTrainer.generalized_jsd_loss`` wherever this TRL keeps it (trl < 1: top level; trl 1.x:
    ``trl.experimental.gkd``); a visible skip when trl is absent or has neither."""
    import importlib
    import warnings

    pytest.importorskip("trl", reason="trl not installed: TRL cross-check skipped (numpy reference covers it)")
    for module_name in ("trl.experimental.gkd", "trl"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # trl.experimental warns that its APIs are unstable
                trainer = getattr(importlib.import_module(module_name), "GKDTrainer", None)
        except (ImportError, AttributeError):
            continue
        if trainer is not None and hasattr(trainer, "generalized_jsd_loss"):
            return trainer.generalized_jsd_loss
    import trl

    pytest.skip(f"trl {trl.__version__} has no GKDTrainer.generalized_jsd_loss (looked in trl.experimental.gkd "
                "and trl): TRL cross-check skipped (numpy reference covers it)")


def test_gkd_jsd_matches_trl_when_installed():
    generalized_jsd_loss = _trl_generalized_jsd()
    V = 10
    logits, ids, tlp, mask, teacher_full = make_topk_inputs(seed=13, V=V, K=V)
    all_tokens = torch.ones_like(mask)
    labels = torch.zeros(mask.shape, dtype=torch.long)  # no -100: every token counts
    for beta in (0.0, 0.5, 1.0):
        ours = gkd_jsd_loss(logits, ids, tlp, all_tokens, beta=beta, tail="renormalize").loss
        theirs = generalized_jsd_loss(logits, teacher_full, labels=labels, beta=beta)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6), beta


# ---------------------------------------------------------------------------------------------------
# weights


def test_position_weights_match_loop_reference():
    g = torch.Generator().manual_seed(14)
    advantages = torch.randn(3, 8, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 2:7] = True
    mask[1, 1:8] = True
    mask[2, 3:5] = True
    gamma = 0.7
    weights = position_weights(advantages, mask, gamma=gamma)
    for b in range(3):
        total = sum(abs(advantages[b, t].item()) for t in range(8) if mask[b, t])
        running = 0.0
        for t in range(8):
            if not mask[b, t]:
                assert weights[b, t].item() == 0.0
                continue
            running += abs(advantages[b, t].item())
            assert weights[b, t].item() == pytest.approx(1 + gamma * (1 - running / total), rel=1e-12)
    assert not weights.requires_grad


def test_position_weights_edge_cases():
    mask = torch.ones(2, 4, dtype=torch.bool)
    advantages = torch.randn(2, 4)
    assert torch.equal(position_weights(advantages, mask, gamma=0.0), torch.ones(2, 4))
    zero = position_weights(torch.zeros(2, 4), mask, gamma=2.0)
    assert torch.equal(zero, torch.ones(2, 4))  # no divergence signal: neutral weights


def test_horizon_discount_counts_from_first_response_token():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    weights = horizon_discount(mask, discount=0.5)
    expected = torch.tensor([[0, 0, 1, 0.5, 0.25, 0], [0, 1, 0.5, 0.25, 0.125, 0.0625]])
    torch.testing.assert_close(weights, expected)
    assert torch.equal(horizon_discount(mask, discount=1.0), mask.float())


# ---------------------------------------------------------------------------------------------------
# validation


def _batch(K: int = 3, V: int = 7, seed: int = 0) -> tuple[Batch, torch.Tensor]:
    """Two collated samples (prompt of 2 tokens; responses of 4 and 3) and float64 student logits over them."""
    rng = np.random.default_rng(seed)
    samples = []
    for R in (4, 3):
        top_RV = np.log(rng.dirichlet(np.ones(V), size=R))
        ids_RK = np.argsort(-top_RV, axis=-1)[:, :K]
        samples.append(Sample(
            prompt_ids=rng.integers(0, V, 2), response_ids=rng.integers(0, V, R),
            behaviour_logprobs=-rng.random(R).astype(np.float32), teacher_logprobs=-rng.random(R).astype(np.float32),
            topk_ids=ids_RK.astype(np.int32), topk_logprobs=np.take_along_axis(top_RV, ids_RK, -1).astype(np.float32),
            policy_version=0,
        ))
    batch = collate(samples, pad_id=0)
    logits_BTV = torch.from_numpy(rng.standard_normal((*batch.input_ids_BT.shape, V)))
    return batch, logits_BTV


@pytest.mark.parametrize(
    ("loss", "reference"),
    [
        ({"kind": "sampled_reverse_kl", "is_cap": 1.5, "baseline": "none", "advantage_clip": None},
         lambda b, lg, w, n: sampled_reverse_kl_loss(
             gather_response_logprobs(lg, b.input_ids_BT), b.behaviour_logprobs_BT, b.teacher_logprobs_BT, b.response_mask_BT, is_cap=1.5, weights_BT=w, normalizer=n)),
        ({"kind": "topk_kl", "direction": "forward", "tail": "renormalize"},
         lambda b, lg, w, n: topk_kl_loss(lg[:, :-1], b.topk_ids_BTK[:, 1:], b.topk_logprobs_BTK[:, 1:],
                                          b.response_mask_BT[:, 1:], direction="forward", tail="renormalize",
                                          weights_BT=w[:, 1:], normalizer=n)),
        ({"kind": "gkd_jsd", "beta": 0.3},
         lambda b, lg, w, n: gkd_jsd_loss(lg[:, :-1], b.topk_ids_BTK[:, 1:], b.topk_logprobs_BTK[:, 1:],
                                          b.response_mask_BT[:, 1:], beta=0.3, weights_BT=w[:, 1:], normalizer=n)),
    ],
    ids=lambda x: x["kind"] if isinstance(x, dict) else "",
)
def test_built_loss_is_the_function_on_aligned_views(loss, reference):
    """`cfg.loss.build()` (what the learner calls) computes exactly its pure function on the shifted views."""
    batch, logits_BTV = _batch()
    weights_BT = torch.rand(batch.response_mask_BT.shape, dtype=torch.float64)
    built = LearnerConfig.model_validate({"loss": loss}).loss.build()
    out = built(batch, logits_BTV, weights_BT=weights_BT, normalizer=9.0)
    expected = reference(batch, logits_BTV, weights_BT, 9.0)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.reverse_kl, expected.reverse_kl, rtol=0, atol=1e-12)


def test_loss_union_kinds_and_shorthand():
    """Each union member is selected by its kind; a bare name means that loss with its defaults."""
    assert LearnerConfig().loss.kind == "topk_kl" and LearnerConfig().loss.tail == "bucket"  # the exact KL
    assert LearnerConfig.model_validate({"loss": "gkd_jsd"}).loss.beta == 0.5
    # options without a kind go to the loss that has them all, else to the default (which names the extra key)
    assert LearnerConfig.model_validate({"loss": {"is_cap": 3}}).loss.kind == "sampled_reverse_kl"
    assert LearnerConfig.model_validate({"loss": {"beta": 0.2}}).loss.kind == "gkd_jsd"
    assert LearnerConfig.model_validate({"loss": {"tail": "renormalize"}}).loss.kind == "topk_kl"
    with pytest.raises(ValueError, match="bogus"):
        LearnerConfig.model_validate({"loss": {"bogus": 1}})
    with pytest.raises(ValueError, match="does not match any of the expected tags"):
        LearnerConfig.model_validate({"loss": {"kind": "forward_kl"}})


def test_top_k_losses_refuse_a_batch_without_top_k():
    empty, logits_BTV = _batch(K=0)  # what a teacher with teacher.topk: 0 sends
    for kind in ("topk_kl", "gkd_jsd"):
        with pytest.raises(ValueError, match=rf"learner.loss.kind={kind} needs teacher top-k"):
            LearnerConfig.model_validate({"loss": kind}).loss.build()(empty, logits_BTV, weights_BT=None, normalizer=1.0)


def test_sampled_reverse_kl_rejects_bad_inputs():
    lp = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="behaviour_logprobs_BT has shape"):
        sampled_reverse_kl_loss(lp, torch.zeros(2, 4), lp, mask, is_cap=2.0)
    with pytest.raises(ValueError, match="mask_BT"):
        sampled_reverse_kl_loss(lp, lp, lp, torch.ones(3, 2), is_cap=2.0)
    with pytest.raises(ValueError, match="logprobs_BT must have 2 dims"):
        sampled_reverse_kl_loss(torch.zeros(6), lp, lp, mask, is_cap=2.0)
    with pytest.raises(ValueError, match="is_cap"):
        sampled_reverse_kl_loss(lp, lp, lp, mask, is_cap=0.0)
    with pytest.raises(ValueError, match="weights_BT has shape"):
        sampled_reverse_kl_loss(lp, lp, lp, mask, is_cap=2.0, weights_BT=torch.ones(2, 2))
    with pytest.raises(ValueError, match="floating-point"):
        sampled_reverse_kl_loss(lp.long(), lp, lp, mask, is_cap=2.0)
    with pytest.raises(ValueError, match="normalizer"):
        sampled_reverse_kl_loss(lp, lp, lp, mask, is_cap=2.0, normalizer=0)


def test_topk_losses_reject_bad_inputs():
    logits, ids, tlp, mask, _ = make_topk_inputs(V=7, K=3)
    with pytest.raises(ValueError, match="topk_logprobs_BTK has shape"):
        topk_kl_loss(logits, ids, tlp[..., :2], mask, direction="forward")
    with pytest.raises(ValueError, match="student_logits_BTV must have 3 dims"):
        topk_kl_loss(logits[0], ids, tlp, mask, direction="forward")
    with pytest.raises(ValueError, match="direction"):
        topk_kl_loss(logits, ids, tlp, mask, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tail"):
        topk_kl_loss(logits, ids, tlp, mask, direction="forward", tail="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer"):
        topk_kl_loss(logits, ids.double(), tlp, mask, direction="forward")
    bad_ids = ids.clone()
    bad_ids[mask.nonzero()[0].tolist()] = torch.tensor([0, 1, 7])
    with pytest.raises(ValueError, match="outside"):
        topk_kl_loss(logits, bad_ids, tlp, mask, direction="forward")
    dup_ids = ids.clone()
    dup_ids[mask.nonzero()[0].tolist()] = torch.tensor([2, 5, 2])
    with pytest.raises(ValueError, match="duplicate"):
        topk_kl_loss(logits, dup_ids, tlp, mask, direction="forward")
    positive = tlp.clone()
    positive[mask.nonzero()[0].tolist()] = torch.tensor([0.5, -1.0, -2.0], dtype=tlp.dtype)
    with pytest.raises(ValueError, match="values >"):
        gkd_jsd_loss(logits, ids, positive, mask, beta=0.5)
    heavy = tlp.clone()
    heavy[mask.nonzero()[0].tolist()] = torch.log(torch.tensor([0.6, 0.5, 0.2], dtype=tlp.dtype))
    with pytest.raises(ValueError, match="sum to more than 1"):
        gkd_jsd_loss(logits, ids, heavy, mask, beta=0.5)
    for beta in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="beta"):
            gkd_jsd_loss(logits, ids, tlp, mask, beta=beta)
    with pytest.raises(ValueError, match="K=8 > vocabulary"):
        topk_kl_loss(logits, torch.zeros(2, 5, 8, dtype=torch.long), torch.zeros(2, 5, 8, dtype=logits.dtype),
                     mask, direction="forward")


def test_weight_helpers_reject_bad_inputs():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="gamma"):
        position_weights(torch.zeros(2, 3), mask, gamma=-1.0)
    with pytest.raises(ValueError, match="mask_BT has shape"):
        position_weights(torch.zeros(2, 3), torch.ones(2, 4), gamma=1.0)
    with pytest.raises(ValueError, match="discount"):
        horizon_discount(mask, discount=0.0)
    with pytest.raises(ValueError, match="discount"):
        horizon_discount(mask, discount=1.5)
