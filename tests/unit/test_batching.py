"""Tests for learner/batching.py.

Behaviours pinned:
- pack_by_tokens never drops or duplicates an item, respects the padded budget
  (len(mb) * max length <= budget) except for a single over-long item alone in its microbatch, is
  deterministic, puts the longest microbatch first, and rejects bad lengths / budgets;
- padding_fraction of lengths and of a collated batch;
- collate right-pads prompt + response rows, sets attention / response masks, places response token j and
  its per-token arrays (behaviour, teacher, top-k) at position P + j, zero elsewhere, rounds T up to
  pad_to_multiple_of, accepts an empty response (protocol-legal) as a row with nothing to train on,
  and rejects malformed samples naming the sample and field;
- gather_response_logprobs returns log p(input_ids[t] | < t) at t (0 at t = 0) computed from logits at
  t - 1, matches a loop reference, honours each row's temperature and top-p (protocol/sampling.py) and
  a position mask, and on a real tiny causal LM the response log-probs of a right-padded batch equal
  those of each sequence run alone;
- Sample carries its sampling parameters; a record without them is refused;
- Sample.from_record reads ScoredPrefix-named fields;
- Batch.to moves every tensor.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from learner.batching import (
    Batch,
    Sample,
    collate,
    gather_response_logprobs,
    pack_by_tokens,
    padding_fraction,
)
from protocol.sampling import token_logprobs


def make_sample(P: int, R: int, K: int = 3, version: int = 0, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    return Sample(
        prompt_ids=rng.integers(1, 50, size=P).astype(np.int32),
        response_ids=rng.integers(1, 50, size=R).astype(np.int32),
        behaviour_logprobs=-rng.random(R).astype(np.float32),
        teacher_logprobs=-rng.random(R).astype(np.float32) - 1,
        topk_ids=rng.integers(0, 50, size=(R, K)).astype(np.int32),
        topk_logprobs=(-rng.random((R, K)) - 2).astype(np.float16),
        policy_version=version,
    )


# ---------------------------------------------------------------------------------------------------
# packing


def test_pack_by_tokens_covers_every_item_once_within_padded_budget():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 60, size=40)]
    budget = 128
    microbatches = pack_by_tokens(lengths, budget)
    flat = sorted(i for mb in microbatches for i in mb)
    assert flat == list(range(len(lengths)))
    for mb in microbatches:
        assert mb == sorted(mb)
        assert len(mb) * max(lengths[i] for i in mb) <= budget
    costs = [len(mb) * max(lengths[i] for i in mb) for mb in microbatches]
    assert max(lengths[i] for i in microbatches[0]) == max(lengths)  # longest first
    assert sum(costs) < len(microbatches) * budget + 1
    assert pack_by_tokens(lengths, budget) == microbatches  # deterministic


def test_pack_by_tokens_isolates_overlong_items_and_fills_first_fit():
    assert pack_by_tokens([300, 10, 10, 10], 100) == [[0], [1, 2, 3]]
    # padded cost: [50, 50] costs 100; adding 10 would cost 150 > 100
    assert pack_by_tokens([50, 10, 50], 100) == [[0, 2], [1]]
    assert pack_by_tokens([], 10) == []
    assert pack_by_tokens([0, 0], 1) == [[0, 1]]


@pytest.mark.parametrize(
    ("lengths", "budget", "match"),
    [([1, -1], 10, r"lengths\[1\]"), ([1, 2.5], 10, r"lengths\[1\]"), ([1], 0, "max_tokens_per_microbatch")],
)
def test_pack_by_tokens_rejects_bad_input(lengths, budget, match):
    with pytest.raises(ValueError, match=match):
        pack_by_tokens(lengths, budget)


def test_padding_fraction():
    assert padding_fraction([4, 4]) == 0.0
    assert padding_fraction([4, 2]) == pytest.approx(0.25)
    assert padding_fraction([]) == 0.0


# ---------------------------------------------------------------------------------------------------
# collate


def test_collate_layout_and_alignment():
    samples = [make_sample(3, 4, version=7, seed=1), make_sample(5, 1, version=9, seed=2)]
    batch = collate(samples, pad_id=0)
    assert batch.input_ids_BT.shape == (2, 7)
    assert batch.topk_ids_BTK.shape == (2, 7, 3)
    assert batch.input_ids_BT.dtype == torch.int64 and batch.topk_ids_BTK.dtype == torch.int64
    assert batch.topk_logprobs_BTK.dtype == torch.float32
    for b, sample in enumerate(samples):
        P, R = len(sample.prompt_ids), len(sample.response_ids)
        row = batch.input_ids_BT[b]
        assert row[:P].tolist() == sample.prompt_ids.tolist()
        assert row[P : P + R].tolist() == sample.response_ids.tolist()
        assert (row[P + R :] == 0).all()
        assert batch.attention_mask_BT[b].tolist() == [1] * (P + R) + [0] * (7 - P - R)
        assert batch.response_mask_BT[b].tolist() == [False] * P + [True] * R + [False] * (7 - P - R)
        for j in range(R):  # response token j at position P + j, with its own per-token data
            assert batch.behaviour_logprobs_BT[b, P + j].item() == pytest.approx(sample.behaviour_logprobs[j])
            assert batch.teacher_logprobs_BT[b, P + j].item() == pytest.approx(sample.teacher_logprobs[j])
            assert batch.topk_ids_BTK[b, P + j].tolist() == sample.topk_ids[j].tolist()
            np.testing.assert_allclose(batch.topk_logprobs_BTK[b, P + j].numpy(),
                                       sample.topk_logprobs[j].astype(np.float32))
        off = ~batch.response_mask_BT[b]
        assert (batch.behaviour_logprobs_BT[b][off] == 0).all()
        assert (batch.topk_ids_BTK[b][off] == 0).all()
    assert batch.policy_versions_B.tolist() == [7, 9]
    assert batch.prompt_lengths_B.tolist() == [3, 5]
    assert batch.response_lengths_B.tolist() == [4, 1]
    assert batch.num_response_tokens == 5
    assert batch.padding_fraction == pytest.approx(1 - 13 / 14)


def test_collate_accepts_an_empty_response_which_trains_on_nothing():
    # The protocol allows R = 0; such a row must not crash the learner, it just has no response tokens.
    empty = make_sample(3, 0, seed=5)
    batch = collate([make_sample(2, 3), empty], pad_id=0)
    assert batch.response_mask_BT[1].sum() == 0
    assert batch.attention_mask_BT[1].tolist() == [1, 1, 1, 0, 0]
    assert batch.response_lengths_B.tolist() == [3, 0]


def test_collate_pads_to_multiple_and_with_pad_id():
    batch = collate([make_sample(2, 3)], pad_id=63, pad_to_multiple_of=8)
    assert batch.input_ids_BT.shape == (1, 8)
    assert batch.input_ids_BT[0, 5:].tolist() == [63, 63, 63]


def bad_sample(**changes) -> Sample:
    fields = make_sample(3, 4).__dict__ | changes
    return Sample(**fields)


@pytest.mark.parametrize(
    ("sample", "match"),
    [
        (bad_sample(prompt_ids=np.zeros(0, np.int32)), r"samples\[1\]\.prompt_ids is empty"),
        (bad_sample(prompt_ids=np.zeros(3, np.float32)), r"samples\[1\]\.prompt_ids must have an integer"),
        (bad_sample(behaviour_logprobs=np.zeros(3, np.float32)), r"samples\[1\]\.behaviour_logprobs has shape"),
        (bad_sample(teacher_logprobs=np.array([0, np.nan, 0, 0], np.float32)), "teacher_logprobs has non-finite"),
        (bad_sample(teacher_logprobs=np.array([0, 0.5, 0, 0], np.float32)), "teacher_logprobs has log-probs > 0"),
        (bad_sample(topk_ids=np.zeros((4, 2), np.int32)), r"topk_logprobs has shape"),
        (bad_sample(topk_ids=np.zeros((3, 3), np.int32)), r"topk_ids has shape"),
        (bad_sample(topk_ids=-np.ones((4, 3), np.int32)), "topk_ids has negative"),
        (bad_sample(response_ids=np.array([1, -2, 3, 4], np.int32)), "response_ids has negative"),
        (bad_sample(policy_version=-1), "policy_version"),
        (bad_sample(prompt_ids=[1, 2, 3]), "must be a numpy array"),
    ],
)
def test_collate_rejects_malformed_samples(sample, match):
    with pytest.raises(ValueError, match=match):
        collate([make_sample(2, 2), sample], pad_id=0)


def test_collate_rejects_bad_batches():
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="top-k width"):
        collate([make_sample(2, 2, K=3), make_sample(2, 2, K=4)], pad_id=0)
    with pytest.raises(ValueError, match="pad_id"):
        collate([make_sample(2, 2)], pad_id=-1)


def test_sample_from_record_and_batch_to():
    source = make_sample(2, 3, version=4)
    record = SimpleNamespace(
        prompt_ids_P=source.prompt_ids, response_ids_R=source.response_ids,
        behaviour_logprobs_R=source.behaviour_logprobs, teacher_logprobs_R=source.teacher_logprobs,
        topk_ids_RK=source.topk_ids, topk_logprobs_RK=source.topk_logprobs, policy_version=4,
        temperature=0.7, top_p=0.9,
    )
    sample = Sample.from_record(record)
    assert sample.policy_version == 4 and sample.response_ids is source.response_ids
    assert (sample.temperature, sample.top_p) == (0.7, 0.9)
    with pytest.raises(ValueError, match="lacks a scored-prefix field"):
        Sample.from_record(SimpleNamespace(prompt_ids_P=source.prompt_ids))
    # A record without its sampling parameters is refused, not read as temperature 1 / top_p 1.
    del record.temperature
    with pytest.raises(ValueError, match="temperature"):
        Sample.from_record(record)
    batch = collate([sample, make_sample(2, 2)], pad_id=0).to("cpu")
    assert isinstance(batch, Batch) and batch.input_ids_BT.device.type == "cpu"
    torch.testing.assert_close(batch.temperature_B, torch.tensor([0.7, 1.0]))
    torch.testing.assert_close(batch.top_p_B, torch.tensor([0.9, 1.0]))
    with pytest.raises(ValueError, match=r"samples\[0\]\.top_p"):
        collate([replace(sample, top_p=0.0)], pad_id=0)


# ---------------------------------------------------------------------------------------------------
# log-prob gathering


def test_gather_response_logprobs_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 5, 7
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    for temperature in (1.0, 0.7):
        out = gather_response_logprobs(logits, ids, temperature=temperature)
        assert out.shape == (B, T)
        for b in range(B):
            assert out[b, 0].item() == 0.0
            for t in range(1, T):
                row = [x / temperature for x in logits[b, t - 1].tolist()]
                lse = max(row) + math.log(sum(math.exp(x - max(row)) for x in row))
                assert out[b, t].item() == pytest.approx(row[ids[b, t].item()] - lse, abs=1e-12)


def test_gather_response_logprobs_per_row_sampling_params_and_mask():
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 6, 30
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    temperature_B = torch.tensor([1.0, 0.7, 0.7], dtype=torch.float64)
    top_p_B = torch.tensor([1.0, 1.0, 0.9], dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 3:] = True
    out = gather_response_logprobs(logits, ids, temperature=temperature_B, top_p=top_p_B, mask_BT=mask)
    assert (out[~mask] == 0).all()
    for b in range(B):
        expected = token_logprobs(logits[b, 2:-1], ids[b, 3:], temperature_B[b].item(), top_p_B[b].item())
        torch.testing.assert_close(out[b, 3:], expected)
    # the per-row settings matter: row 1 at temperature 0.7 is not the temperature-1 value
    assert not torch.allclose(out[1, 3:], gather_response_logprobs(logits, ids)[1, 3:])
    with pytest.raises(ValueError, match="top_p must be in"):
        gather_response_logprobs(logits, ids, top_p=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="temperature must be a number or a float tensor of shape"):
        gather_response_logprobs(logits, ids, temperature=torch.ones(2))


def test_gather_response_logprobs_upcasts_bf16_and_keeps_gradient():
    logits = torch.randn(1, 4, 9, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 9, (1, 4))
    out = gather_response_logprobs(logits, ids)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert logits.grad is not None and logits.grad[0, -1].abs().sum() == 0  # last logits predict nothing


def test_gather_response_logprobs_rejects_bad_input():
    logits = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match="input_ids_BT must have shape"):
        gather_response_logprobs(logits, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        gather_response_logprobs(logits, torch.tensor([[0, 5, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        gather_response_logprobs(logits, torch.zeros(1, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="logits_BTV must be a 3-D"):
        gather_response_logprobs(torch.zeros(3, 5), torch.zeros(1, 3, dtype=torch.long))


def test_padded_batch_logprobs_equal_unpadded_on_a_tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    samples = [make_sample(3, 5, seed=3), make_sample(6, 2, seed=4)]
    batch = collate(samples, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        batched = gather_response_logprobs(logits, batch.input_ids_BT)
        for b, sample in enumerate(samples):
            ids = torch.from_numpy(np.concatenate([sample.prompt_ids, sample.response_ids])).long()[None]
            alone = gather_response_logprobs(model(input_ids=ids).logits, ids)[0]
            P, R = len(sample.prompt_ids), len(sample.response_ids)
            torch.testing.assert_close(batched[b][batch.response_mask_BT[b]], alone[P : P + R],
                                       atol=1e-5, rtol=1e-5)


def test_micro_batch_budget_accounts_for_the_vocabulary() -> None:
    """learner.max_logits_mb cuts the token budget at a real vocabulary and never at a tiny one: 4 fp32 copies
    of tokens x vocab must fit (SmolLM2's 49,152 ids: 1 GiB holds 1,365 tokens)."""
    from learner.step import LOGITS_COPIES, micro_batch_budget

    assert micro_batch_budget(4096, 1024, 49152) == (1024 << 20) // (49152 * 4 * LOGITS_COPIES) == 1365
    assert micro_batch_budget(4096, 256, 49152) == 341
    assert micro_batch_budget(4096, 1024, 70) == 4096  # a character vocabulary is never cut
    assert micro_batch_budget(4096, 1, 152064) == 16  # never below 16 tokens
    assert micro_batch_budget(4096, 1024, 0) == 4096  # an unknown vocabulary: the configured budget
