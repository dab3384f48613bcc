"""`bench/kl_views.py --grad` on the shipped task models (~1M parameters, a 43-id vocabulary: seconds).

Pins what its gradient table means: a top-k loss whose k covers the whole vocabulary is the exact reverse KL
(cosine 1, the bucket empty), a small k is another direction, and the sampled-token estimator's cosine is a
cosine (in [-1, 1]) of a different, noisy gradient.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]


def _kl_views():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("kl_views", REPO / "bench" / "kl_views.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gradient_agreement_is_one_for_the_whole_vocabulary_and_less_for_a_small_k() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.evaluate import _logits, _positions, _sample
    from protocol.prompts import PromptFormat, load_prompts

    task = REPO / "models" / "task"
    tokenizer = AutoTokenizer.from_pretrained(task / "student")
    prompts = load_prompts(task / "prompts.jsonl", tokenizer, PromptFormat(), limit=3)
    student = AutoModelForCausalLM.from_pretrained(task / "student", dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(task / "teacher", dtype=torch.float32).eval()
    V = len(tokenizer)
    with torch.no_grad():
        ids_BT, attn_BT, mask_BR, P = _sample(student, prompts, 48, pad_id=int(tokenizer.pad_token_id),
                                              eos_id=tokenizer.eos_token_id, vocab_size=V,
                                              gen=torch.Generator().manual_seed(0))
        pos_BT = _positions(attn_BT)
        logp = F.log_softmax(_logits(teacher, ids_BT, attn_BT, pos_BT, V)[:, P - 1:P - 1 + mask_BR.shape[1]], -1)
    got = _kl_views().gradient_agreement(student, ids_BT, attn_BT, pos_BT, P, mask_BR, logp, [V, 2], V)
    assert set(got) == {"sampled token (score fn.)", f"top-{V} + tail bucket", "top-2 + tail bucket",
                        f"top-{V} + sampled tail", "top-2 + sampled tail"}
    assert got[f"top-{V} + tail bucket"] > 1 - 1e-5 and got[f"top-{V} + sampled tail"] > 1 - 1e-5
    assert got["top-2 + tail bucket"] < 0.999
    assert all(-1 <= c <= 1 for c in got.values())
