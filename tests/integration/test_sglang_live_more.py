"""More live checks against real SGLang servers (GPU), beside test_sglang_live.py; skipped unless configured:

    OPD_SGLANG_URL=http://127.0.0.1:30000          student server
    OPD_SGLANG_TEACHER_URL=http://127.0.0.1:30001  teacher server (the tiny GPU teacher of opd/tiny_gpu.py)
    OPD_SGLANG_DETERMINISTIC=1                     the student server runs --enable-deterministic-inference

scripts/gpu-smoke.sh starts both servers on the models of opd/tiny_gpu.py and runs this module.

Pins what only a running server can show (issue 18, the GPU smoke check):
- stop at EOS: greedy continuations of task prompts by the trained teacher end on <eos>, flagged finished,
  within the budget; continuations not flagged finished fill the budget exactly;
- seeds: under --enable-deterministic-inference the same seed gives the same tokens and logprobs, and
  another seed other tokens;
- abort and retry: a weight reload (pause mode `abort`) while a long batch is in flight ends that request
  with an error the actor treats as transient, and the retry succeeds on the server now reporting the new
  weight_version.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from actors.engines.sglang import SGLangRolloutEngine
from opd.tiny import EOS_ID, build_tokenizer, sequence_examples
from protocol.sglang_http import SGLangError

pytestmark = pytest.mark.sglang

PROMPTS = [[1, 100, 200, 300, 400], [1, 500, 600]]


def _engine(var: str) -> SGLangRolloutEngine:
    url = os.environ.get(var)
    if not url:
        pytest.skip(f"{var} is not set: no live SGLang server to test against (see this module's docstring)")
    engine = SGLangRolloutEngine(url, timeout_s=300)
    assert engine.health(), f"{engine.base_url}/health did not answer 200"
    return engine


@pytest.fixture(scope="module")
def student() -> SGLangRolloutEngine:
    return _engine("OPD_SGLANG_URL")


@pytest.fixture(scope="module")
def teacher_as_sampler() -> SGLangRolloutEngine:
    return _engine("OPD_SGLANG_TEACHER_URL")


def test_generation_stops_at_eos(teacher_as_sampler: SGLangRolloutEngine) -> None:
    tokenizer = build_tokenizer()  # the GPU models keep the CPU task's character ids
    prompts = [tokenizer.encode(ex.prompt) for ex in sequence_examples()[:16]]
    budget = 64
    out = teacher_as_sampler.generate(prompts, [budget] * len(prompts), temperature=0.0, top_p=1.0, seed=None)
    finished = [g for g in out if g.finished]
    assert finished, "no greedy continuation of a task prompt ended on <eos>: is this the trained tiny GPU teacher?"
    for generation in out:
        if generation.finished:
            assert generation.response_ids[-1] == EOS_ID and len(generation.response_ids) <= budget
        else:
            assert len(generation.response_ids) == budget, "stopped early without being flagged finished"


def test_the_same_seed_gives_the_same_sample(student: SGLangRolloutEngine) -> None:
    if os.environ.get("OPD_SGLANG_DETERMINISTIC") != "1":
        pytest.skip("OPD_SGLANG_DETERMINISTIC=1 is not set: seeds are honoured only by a server started with "
                    "--enable-deterministic-inference")
    first = student.generate(PROMPTS, [16, 16], temperature=1.0, top_p=1.0, seed=7)
    again = student.generate(PROMPTS, [16, 16], temperature=1.0, top_p=1.0, seed=7)
    other = student.generate(PROMPTS, [16, 16], temperature=1.0, top_p=1.0, seed=8)
    assert [g.response_ids for g in first] == [g.response_ids for g in again]
    assert [g.logprobs for g in first] == [g.logprobs for g in again]
    assert [g.response_ids for g in first] != [g.response_ids for g in other]


def test_a_reload_aborts_requests_in_flight_and_the_retry_succeeds(student: SGLangRolloutEngine) -> None:
    path = str(student.model_info()["model_path"])
    reloader = SGLangRolloutEngine(student.base_url, timeout_s=300)
    prompts = [[1, 100 + i, 200 + i] for i in range(32)]
    result: dict[str, object] = {}

    def sample(seed: int) -> None:
        try:
            result["out"] = student.generate(prompts, [900] * len(prompts), temperature=1.0, top_p=1.0, seed=seed)
        except Exception as exc:  # what the actor's loop would catch
            result["exc"] = exc

    version = 990100
    for attempt in range(3):  # a batch that ends before the reload starts proves nothing: try again
        version += 1
        result.clear()
        thread = threading.Thread(target=sample, args=(attempt,))
        thread.start()
        time.sleep(0.5)
        reloader.load_weights(path, version)
        thread.join(300)
        if "exc" in result:
            break
    else:
        pytest.fail("three batches of 32 x 900 tokens each finished before a reload began: nothing was aborted")
    exc = result["exc"]
    assert isinstance(exc, SGLangError) and student.is_transient(exc), repr(exc)
    retry = student.generate(PROMPTS, [4, 4], temperature=1.0, top_p=1.0, seed=1)
    assert all(1 <= len(g.response_ids) <= 4 for g in retry)
    assert reloader.model_info().get("weight_version") == str(version)
