"""The constructors actors, teachers and `opd doctor` build their messages with (protocol/messages.py)."""

from __future__ import annotations

import numpy as np

from protocol.messages import RolloutPrefix, ScoredPrefix, decode, encode

META = {"prompt_index": 3, "horizon": 4, "max_new_tokens": 8, "finished": False, "policy_version": 2,
        "actor_id": "a", "temperature": 0.7, "top_p": 0.9}


def _rollout() -> RolloutPrefix:
    return RolloutPrefix.from_sample([5, 6, 7], [8, 9], [-0.5, 3e-7], **META)


def test_from_sample_types_and_clamps_an_engines_lists() -> None:
    r = _rollout()
    assert r.prompt_ids_P.dtype == np.int32 and r.response_ids_R.dtype == np.int32
    assert r.behaviour_logprobs_R.dtype == np.float32
    assert r.behaviour_logprobs_R.tolist() == [-0.5, 0.0]  # a hair above 0 from the engine becomes 0
    r.validate()
    assert decode(encode(r), expect=RolloutPrefix).behaviour_logprobs_R.tolist() == [-0.5, 0.0]


def test_from_sequence_scores_slices_the_response_and_counts_what_the_cache_held() -> None:
    r = _rollout()  # P = 3, R = 2, T = 5
    T, K = 5, 2
    logprobs = -np.arange(T, dtype=np.float32)
    ids = np.arange(T * K, dtype=np.int32).reshape(T, K)
    top = -np.ones((T, K), dtype=np.float32)
    for cached_upto, cached in [(0, 0), (3, 0), (4, 1), (5, 2)]:
        s = ScoredPrefix.from_sequence_scores(r, logprobs, ids, top, teacher_id="t", cached_upto=cached_upto)
        assert (s.cached_tokens, s.scored_tokens) == (cached, 2 - cached)
        assert s.teacher_logprobs_R.tolist() == [-3.0, -4.0] and s.topk_ids_RK.tolist() == [[6, 7], [8, 9]]
        assert s.id == r.id and s.temperature == 0.7 and s.teacher_id == "t"
        s.validate()
    ids[3, 0] = -1  # a copy, not a view: the message keeps what the teacher scored when it was built
    assert s.topk_ids_RK[0, 0] == 6
