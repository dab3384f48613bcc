"""Held-out evaluation samples with the student's KV cache: the same samples and KL as recomputing every prefix.

Real (random, tiny) Llama models of the experiment task's tokenizer; ragged prompts, so left padding and
the position ids under a cache are exercised, and rows finish at different steps.
"""

from __future__ import annotations

import pytest
import torch

from learner.evaluate import heldout_reverse_kl
from opd.experiment import task
from opd.experiment.train import ModelSpec, make_model


@pytest.mark.parametrize("eos_id", [task.EOS_ID, None])
def test_cached_sampling_matches_recomputation(eos_id: int | None) -> None:
    torch.manual_seed(0)
    tokenizer = task.build_tokenizer()
    student = make_model(ModelSpec(hidden=16, layers=2, heads=2, intermediate=32), len(tokenizer))
    teacher = make_model(ModelSpec(hidden=32, layers=2, heads=2, intermediate=64), len(tokenizer))
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in task.generate(3, 6)]
    prompts[1], prompts[4] = prompts[1][:9], prompts[4][:17]  # ragged: rows are left-padded differently
    kwargs = dict(max_new_tokens=24, pad_id=task.PAD_ID, eos_id=eos_id, vocab_size=len(tokenizer), batch_size=4)
    cached = heldout_reverse_kl(student, teacher, prompts, use_cache=True, **kwargs)
    recomputed = heldout_reverse_kl(student, teacher, prompts, use_cache=False, **kwargs)
    assert cached.tokens == recomputed.tokens > 0
    assert cached.reverse_kl == pytest.approx(recomputed.reverse_kl, rel=1e-4, abs=1e-6)
    if eos_id is None:
        assert cached.tokens == 24 * len(prompts)


def test_kl_by_position_buckets_add_up_to_the_mean() -> None:
    """The per-bucket KL is the same per-token KL, split by response position: token-weighted it is the mean."""
    torch.manual_seed(1)
    tokenizer = task.build_tokenizer()
    student = make_model(ModelSpec(hidden=16, layers=2, heads=2, intermediate=32), len(tokenizer))
    teacher = make_model(ModelSpec(hidden=32, layers=2, heads=2, intermediate=64), len(tokenizer))
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in task.generate(5, 5)]
    kwargs = dict(max_new_tokens=20, pad_id=task.PAD_ID, eos_id=None, vocab_size=len(tokenizer), batch_size=2)
    plain = heldout_reverse_kl(student, teacher, prompts, **kwargs)
    split = heldout_reverse_kl(student, teacher, prompts, position_edges=(0, 5, 12), **kwargs)
    assert plain.kl_by_position is None and split.reverse_kl == pytest.approx(plain.reverse_kl)
    assert split.tokens_by_position == [5 * 5, 7 * 5, 8 * 5]  # no EOS: every row runs 20 tokens
    weighted = sum(k * n for k, n in zip(split.kl_by_position, split.tokens_by_position, strict=True)) / split.tokens
    assert weighted == pytest.approx(split.reverse_kl, rel=1e-6)
    assert len(set(round(k, 6) for k in split.kl_by_position)) == 3  # random models: the buckets differ
