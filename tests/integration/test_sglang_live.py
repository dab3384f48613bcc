"""Live checks against real SGLang servers (GPU). Skipped, with the reason shown, unless configured:

    OPD_SGLANG_URL=http://127.0.0.1:30000          student server (rollout engine tests)
    OPD_SGLANG_TEACHER_URL=http://127.0.0.1:30001  teacher server (scorer tests)

    pytest -m sglang tests/integration/test_sglang_live.py -rs

Pins, on a real server, what the unit tests can only pin against documented bodies:
- generation returns at most the budget, finite non-positive logprobs, and stops are flagged;
- the scorer's position arithmetic: scoring a greedy continuation on the same server gives each
  greedy token as the top-1 candidate with the logprob the sampler reported, and scoring from a
  later start gives the same numbers as the tail of a full scoring;
- a weight reload (pause -> update_weights_from_disk -> continue) from the server's own checkpoint
  succeeds and generation works afterwards;
- at temperature 0.7 (top_p 1, the only top-p allowed with SGLang) the behaviour logprobs are those of
  `log_softmax(logits / 0.7)`, the transform the learner recomputes (`protocol/sampling.py`), checked
  against transformers on the server's own checkpoint when that directory is readable here.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from actors.engines.sglang import UPDATE_FROM_DISK, SGLangRolloutEngine
from cache.scorers.sglang import SGLangTeacherScorer

pytestmark = pytest.mark.sglang

# Small ids exist in every real vocabulary; no tokenizer needed.
PROMPTS = [[1, 100, 200, 300, 400], [1, 500, 600]]


def _url(var: str) -> str:
    url = os.environ.get(var)
    if not url:
        pytest.skip(f"{var} is not set: no live SGLang server to test against (see this module's docstring)")
    return url


@pytest.fixture(scope="module")
def student() -> SGLangRolloutEngine:
    engine = SGLangRolloutEngine(_url("OPD_SGLANG_URL"), timeout_s=300)
    assert engine.health(), f"{engine.base_url}/health did not answer 200"
    return engine


@pytest.fixture(scope="module")
def teacher() -> SGLangTeacherScorer:
    return SGLangTeacherScorer(_url("OPD_SGLANG_TEACHER_URL"))


def test_generate_respects_budgets(student: SGLangRolloutEngine) -> None:
    out = student.generate(PROMPTS, [16, 4], temperature=1.0, top_p=1.0, seed=0)
    assert len(out) == 2
    for generation, budget in zip(out, [16, 4], strict=True):
        assert 1 <= len(generation.response_ids) <= budget
        assert len(generation.logprobs) == len(generation.response_ids)
        assert all(math.isfinite(lp) and lp <= 1e-4 for lp in generation.logprobs)
        if len(generation.response_ids) < budget:
            assert generation.finished, "stopped before the budget but not flagged as finished"


def test_scoring_lines_up_with_greedy_generation(student: SGLangRolloutEngine) -> None:
    """Score the student's own greedy continuation on the same server: positions must line up."""
    (greedy,) = student.generate(PROMPTS[:1], [12], temperature=0.0, top_p=1.0, seed=None)
    sequence = np.array(PROMPTS[0] + greedy.response_ids, dtype=np.int32)
    scorer = SGLangTeacherScorer(student.base_url)
    (scores,) = scorer.score([sequence], [len(PROMPTS[0])], 5)
    r = len(greedy.response_ids)
    assert scores.logprobs_R.shape == (r,) and scores.topk_ids_RK.shape == (r, 5)
    np.testing.assert_array_equal(scores.topk_ids_RK[:, 0], greedy.response_ids)
    np.testing.assert_allclose(scores.logprobs_R, scores.topk_logprobs_RK[:, 0], atol=1e-5)
    # temperature 0 is greedy with raw logprobs; prefill vs decode kernels differ slightly
    np.testing.assert_allclose(scores.logprobs_R, greedy.logprobs, atol=0.05)
    assert scorer.tokens_forwarded == len(sequence)


def test_teacher_scores_are_consistent_across_starts(teacher: SGLangTeacherScorer) -> None:
    sequence = np.array([1, 100, 200, 300, 400, 500, 600, 700], dtype=np.int32)
    full, tail = teacher.score([sequence, sequence], [1, 5], 5)
    assert full.logprobs_R.shape == (7,) and tail.logprobs_R.shape == (3,)
    assert np.all(np.isfinite(full.logprobs_R)) and np.all(full.logprobs_R <= 1e-4)
    np.testing.assert_allclose(tail.logprobs_R, full.logprobs_R[4:], atol=0.05)
    np.testing.assert_array_equal(tail.topk_ids_RK[:, 0], full.topk_ids_RK[4:, 0])
    assert np.all(np.diff(full.topk_logprobs_RK, axis=1) <= 1e-6), "top-k must come sorted, best first"
    assert len(teacher.identity) == 64 and teacher.identity_fields["backend"] == "sglang"


def test_reload_own_checkpoint(student: SGLangRolloutEngine) -> None:
    """Reload the server's own weights (as SGLang's docs do); generation must work afterwards.

    The server is left with the weight version it had: actors never load below the version a server
    reports, so a pipeline run on it next would otherwise find a version its learner never announced.
    """
    info = student.model_info()
    path, before = info["model_path"], info.get("weight_version")
    version = int(os.environ.get("OPD_SGLANG_TEST_VERSION", "990001"))
    try:
        student.load_weights(path, version)
        assert student.model_info().get("weight_version") == str(version)
        (after,) = student.generate(PROMPTS[:1], [4], temperature=1.0, top_p=1.0, seed=1)
        assert 1 <= len(after.response_ids) <= 4
        assert after.policy_version == version  # tagged with what the server ran (meta_info.weight_version)
        student.load_weights(path, version - 1)  # a lagging actor's older version is never loaded over it
        assert student.model_info().get("weight_version") == str(version)
    finally:
        student.http.call("POST", UPDATE_FROM_DISK, {"model_path": path, "weight_version": before},
                          student.load_timeout_s)


def test_behaviour_logprobs_are_of_the_tempered_distribution(student: SGLangRolloutEngine) -> None:
    """The learner's log pi (protocol/sampling.py) at the same weights matches SGLang's at T=0.7."""
    path = str(student.model_info().get("model_path", ""))
    if not os.path.isdir(path):
        pytest.skip(f"the server's model_path {path!r} is not a directory here: cannot recompute with transformers")
    import torch
    from transformers import AutoModelForCausalLM

    from protocol.sampling import token_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model = model.to(device).eval()
    for prompt, gen in zip(PROMPTS, student.generate(PROMPTS, [8, 8], temperature=0.7, top_p=1.0, seed=0), strict=True):
        ids = torch.tensor([prompt + gen.response_ids], device=device)
        with torch.no_grad():
            logits_RV = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        tokens_R = torch.tensor(gen.response_ids, device=device)
        behaviour_R = torch.tensor(gen.logprobs, device=device)
        tempered = (token_logprobs(logits_RV, tokens_R, 0.7, 1.0) - behaviour_R).abs().mean().item()
        untempered = (token_logprobs(logits_RV, tokens_R, 1.0, 1.0) - behaviour_R).abs().mean().item()
        # bf16 kernels differ between SGLang and transformers; the temperature must not
        assert tempered < 0.05 and tempered <= untempered + 0.01, (tempered, untempered)
