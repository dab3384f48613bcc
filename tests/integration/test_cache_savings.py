"""What the teacher cache saves, counted honestly (issue 8, defect 8).

A real teacher (tiny real model, real Redis, real Zarr). The HF scorer re-reads the whole context of a
partially cached sequence, so a partial hit reuses scores but saves no forward compute. Pinned:
- `opd_compute_saved_flops_total{stage="teacher_cache"}` (and the run-wide ledger stat) grows by
  2 x params x T for a fully cached sequence of T tokens and by nothing for a partial hit, also when
  both are in one batch: it equals what the scorer did not forward;
- `opd_teacher_tokens_cached_total` counts the partial hit's cached response tokens;
- the metrics' help texts say which is which.
"""

from __future__ import annotations

import numpy as np
import pytest
import redis

from cache.config import TeacherConfig
from cache.teacher import Teacher
from opd.tiny import asset_paths
from protocol import ledger
from protocol.config import TransportConfig
from protocol.messages import RolloutPrefix
from protocol.names import Names
from protocol.streams import StreamQueue

pytestmark = pytest.mark.integration

NS = "savings"
SAVED = 'opd_compute_saved_flops_total'


def rollout(seq: np.ndarray, prompt_len: int) -> RolloutPrefix:
    r = len(seq) - prompt_len
    return RolloutPrefix(
        prompt_ids_P=seq[:prompt_len].astype(np.int32), response_ids_R=seq[prompt_len:].astype(np.int32),
        behaviour_logprobs_R=np.full(r, -1.0, np.float32), prompt_index=0, horizon=r, max_new_tokens=r,
        finished=False, policy_version=0, actor_id="test",
    )


def score(teacher: Teacher, client: redis.Redis, rollouts: list[RolloutPrefix]) -> int:
    """Publish `rollouts`, step the teacher until all are forwarded; returns the tokens it forwarded."""
    names = Names(NS)
    q = StreamQueue(client, names.rollouts, names=names)
    for r in rollouts:
        q.publish(r)
    before, want = teacher.scorer.tokens_forwarded, client.xlen(names.scored) + len(rollouts)
    for _ in range(200):
        if client.xlen(names.scored) >= want:
            break
        teacher.step()
    assert client.xlen(names.scored) == want
    return teacher.scorer.tokens_forwarded - before


def metric(teacher: Teacher, name: str, **labels: str) -> float:
    value = teacher.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_only_full_hits_count_as_compute_saved(tiny_assets, tmp_path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    cfg = TeacherConfig(model_dir=str(asset_paths(tiny_assets).teacher_dir), topk=2, batch_size=8, device="cpu",
                        cache_dir=str(tmp_path / "cache"), block_size=16)
    transport = TransportConfig(redis_url=redis_url, namespace=NS, high_water=10_000)
    client = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(0)
    first = rng.integers(4, 52, 70).astype(np.int32)
    partial = np.concatenate([first[:48], rng.integers(4, 52, 30)]).astype(np.int32)
    partial[48] = 4 if first[48] != 4 else 5  # diverges at a block boundary: 3 blocks shared
    teacher = Teacher(cfg, transport, worker_id="teacher-savings")
    try:
        per_token = 2 * teacher.params
        assert score(teacher, client, [rollout(first, 10)]) == 70
        assert metric(teacher, SAVED, stage="teacher_cache") == 0

        forwarded = score(teacher, client, [rollout(partial, 10)])  # a partial hit
        assert forwarded == len(partial)  # the whole sequence ran through the teacher again
        assert metric(teacher, "opd_teacher_tokens_cached_total") == 48 - 10  # its cached response tokens
        assert metric(teacher, SAVED, stage="teacher_cache") == 0  # ... but no compute was saved

        forwarded = score(teacher, client, [rollout(first, 10)])  # a full hit
        assert forwarded == 0
        assert metric(teacher, SAVED, stage="teacher_cache") == per_token * 70

        fresh = rng.integers(4, 52, 40).astype(np.int32)
        third = np.concatenate([first[:32], rng.integers(4, 52, 20)]).astype(np.int32)
        third[32] = 4 if first[32] != 4 else 5
        forwarded = score(teacher, client, [rollout(partial, 10), rollout(third, 5), rollout(fresh, 5)])  # one batch
        assert forwarded == len(third) + len(fresh)  # the repeated `partial` is now a full hit
        assert metric(teacher, SAVED, stage="teacher_cache") == per_token * (70 + len(partial))
        assert ledger.stats(client, Names(NS))["flops_saved_cache"] == per_token * (70 + len(partial))
    finally:
        teacher.close()


def test_help_texts_say_what_is_and_is_not_saved(tiny_assets, tmp_path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    cfg = TeacherConfig(model_dir=str(asset_paths(tiny_assets).teacher_dir), device="cpu",
                        cache_dir=str(tmp_path / "cache"))
    teacher = Teacher(cfg, TransportConfig(redis_url=redis_url, namespace=NS), worker_id="teacher-help")
    try:
        docs = {m.name: m.documentation for m in teacher.registry.collect()}
    finally:
        teacher.close()
    assert "fully cached sequences" in docs["opd_compute_saved_flops"]
    assert "a partial hit still runs the teacher over the whole sequence" in docs["opd_compute_saved_flops"]
    assert "not compute saved" in docs["opd_teacher_tokens_cached"]
