"""A real teacher (tiny real model, real Redis, real Zarr on disk) in front of its logprob cache.

What is pinned, and why it matters:
- cache reuse is real and exact: a rollout sharing a prefix with an earlier one gets the shared
  blocks from the cache (bit-identical to what the first one stored) and everything it forwards
  equals a fresh cache-less scoring; an exact repeat costs no teacher forward at all;
- `opd cache warm` writes what a live teacher would have written (the teacher then forwards nothing);
- damage never turns into wrong training signal: a corrupted chunk is recomputed, and
  `opd cache verify` names the shard; a lost Redis index is rebuilt from the shards alone;
- a teacher killed with SIGKILL loses no message and leaves a cache that verifies clean;
- a cache that fails (lookup or put) costs compute, never the work.

The transformers scorer re-reads the whole context of a partially cached sequence, so its
`tokens_forwarded` only drops for fully cached sequences; partial reuse shows in `cached_tokens`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from cache.config import TeacherConfig
from cache.scorers.hf import HFTeacherScorer
from cache.store import TeacherCache
from cache.teacher import Teacher
from opd import cli as opd_cli
from opd.tiny import BOS_ID, EOS_ID, asset_paths
from protocol import ledger
from protocol.config import TransportConfig
from protocol.messages import RolloutPrefix, ScoredPrefix, decode
from protocol.names import Names
from protocol.streams import StreamQueue, read_dead_letters

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NS = "tc"
K = 4
BLOCK = 16
TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def configs(tiny_assets: Path, tmp_path: Path, redis_url: str, **teacher: Any) -> tuple[TeacherConfig, TransportConfig]:
    base: dict[str, Any] = {"model_dir": str(asset_paths(tiny_assets).teacher_dir), "topk": K, "batch_size": 8,
                            "engine": {"kind": "hf", "device": "cpu"}, "cache_dir": str(tmp_path / "cache"), "block_size": BLOCK}
    t = TeacherConfig(**(base | teacher))
    return t, TransportConfig(redis_url=redis_url, namespace=NS, high_water=100_000, claim_idle_ms=500)


def cli_sets(t: TeacherConfig, tr: TransportConfig) -> list[str]:
    """The `--set` arguments that give `opd ...` the same config."""
    values = {"transport.redis_url": tr.redis_url, "transport.namespace": tr.namespace,
              "transport.high_water": tr.high_water, "transport.claim_idle_ms": tr.claim_idle_ms,
              "teacher.model_dir": t.model_dir, "teacher.topk": t.topk, "teacher.batch_size": t.batch_size,
              "teacher.engine.device": t.engine.device, "teacher.cache_dir": t.cache_dir, "teacher.block_size": t.block_size}
    out: list[str] = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def vocab(tiny_assets: Path) -> int:
    return int(json.loads((asset_paths(tiny_assets).teacher_dir / "config.json").read_text())["vocab_size"])


def rollout(seq: np.ndarray, prompt_len: int) -> RolloutPrefix:
    r = len(seq) - prompt_len
    return RolloutPrefix(
        prompt_ids_P=np.asarray(seq[:prompt_len], np.int32), response_ids_R=np.asarray(seq[prompt_len:], np.int32),
        behaviour_logprobs_R=np.full(r, -1.0, np.float32), prompt_index=0, horizon=max(1, r), max_new_tokens=max(1, r),
        finished=False, policy_version=0, actor_id="test",
    )


def publish(client: redis.Redis, rollouts: list[RolloutPrefix]) -> None:
    names = Names(NS)
    q = StreamQueue(client, names.rollouts, names=names)
    for r in rollouts:
        q.publish(r)


def scored_messages(client: redis.Redis) -> list[ScoredPrefix]:
    out = []
    for _eid, fields in client.xrange(Names(NS).scored):
        msg = decode(fields[b"m"], expect=ScoredPrefix)
        assert isinstance(msg, ScoredPrefix)
        out.append(msg)
    return out


def run_until(teacher: Teacher, client: redis.Redis, n_scored: int, timeout_s: float = 60.0) -> dict[str, ScoredPrefix]:
    """Step the teacher until the scored stream holds `n_scored` messages; returns them by message id."""
    deadline = time.monotonic() + timeout_s
    while client.xlen(Names(NS).scored) < n_scored:
        assert time.monotonic() < deadline, f"only {client.xlen(Names(NS).scored)} of {n_scored} scored in time"
        teacher.step()
    return {m.id: m for m in scored_messages(client)}


def score_one(teacher: Teacher, client: redis.Redis, r: RolloutPrefix) -> tuple[ScoredPrefix, int]:
    """Publish one rollout, let the teacher handle it; returns its scored message and forward-token delta."""
    before = teacher.scorer.tokens_forwarded
    publish(client, [r])
    got = run_until(teacher, client, client.xlen(Names(NS).scored) + 1)
    return got[r.id], teacher.scorer.tokens_forwarded - before


def assert_matches_fresh(fresh: HFTeacherScorer, *msgs: ScoredPrefix) -> None:
    """The forwarded scores equal a cache-less scoring of the same ids (top-k ids where not near-tied)."""
    seqs = [np.concatenate([m.prompt_ids_P, m.response_ids_R]).astype(np.int32) for m in msgs]
    refs = fresh.score(seqs, [len(m.prompt_ids_P) for m in msgs], K)
    for msg, ref in zip(msgs, refs, strict=True):
        np.testing.assert_allclose(msg.teacher_logprobs_R, ref.logprobs_R, atol=TOL, rtol=0, err_msg=msg.id)
        np.testing.assert_allclose(msg.topk_logprobs_RK, ref.topk_logprobs_RK, atol=TOL, rtol=0, err_msg=msg.id)
        gaps = np.diff(ref.topk_logprobs_RK, axis=1)
        clear = np.ones_like(ref.topk_ids_RK, dtype=bool)
        clear[:, :-1] &= gaps < -1e-4
        clear[:, 1:] &= gaps < -1e-4
        assert np.array_equal(msg.topk_ids_RK[clear], ref.topk_ids_RK[clear]), msg.id


def random_seq(rng: np.random.Generator, n: int, v: int) -> np.ndarray:
    return rng.integers(0, v, n).astype(np.int32)


@pytest.fixture(scope="module")
def fresh(tiny_assets: Path) -> HFTeacherScorer:
    return HFTeacherScorer(asset_paths(tiny_assets).teacher_dir)


# ---------------------------------------------------------------------------------------------
# (a) shared prefix, (b) exact repeat
# ---------------------------------------------------------------------------------------------


def test_shared_prefix_reuses_blocks_and_matches_fresh_scoring(
    tiny_assets: Path, tmp_path: Path, redis_url: str, fresh: HFTeacherScorer
) -> None:
    t, tr = configs(tiny_assets, tmp_path, redis_url)
    client = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(0)
    v = vocab(tiny_assets)
    first = random_seq(rng, 100, v)
    second = np.concatenate([first[:64], random_seq(rng, 36, v)])
    second[64] = (first[64] + 1) % v  # diverge exactly at position 64 (a block boundary)
    teacher = Teacher(t, tr, worker_id="teacher-a")
    try:
        s1, fw1 = score_one(teacher, client, rollout(first, 20))
        assert (s1.cached_tokens, s1.scored_tokens, fw1) == (0, 80, 100)
        s2, fw2 = score_one(teacher, client, rollout(second, 20))
        # 4 shared blocks (positions 0..63) come from the cache: 44 of them are response tokens.
        assert (s2.cached_tokens, s2.scored_tokens) == (64 - 20, 36)
        assert fw2 == len(second)  # the scorer re-reads the cached context to score the rest
        assert np.array_equal(s2.teacher_logprobs_R[:44], s1.teacher_logprobs_R[:44])  # bit-identical: served
        assert np.array_equal(s2.topk_logprobs_RK[:44], s1.topk_logprobs_RK[:44])
        assert_matches_fresh(fresh, s1, s2)
        stats = ledger.stats(client, Names(NS))
        assert stats["teacher_tokens_cached"] == 44 and stats["teacher_tokens_scored"] == 80 + 36
        assert teacher.registry.get_sample_value("opd_cache_hit_tokens_total") == 64
    finally:
        teacher.close()


def test_exact_repeat_is_served_entirely_from_the_cache(
    tiny_assets: Path, tmp_path: Path, redis_url: str, fresh: HFTeacherScorer
) -> None:
    t, tr = configs(tiny_assets, tmp_path, redis_url)
    client = redis.Redis.from_url(redis_url)
    seq = random_seq(np.random.default_rng(1), 77, vocab(tiny_assets))  # a partial last block too
    teacher = Teacher(t, tr, worker_id="teacher-a")
    try:
        s1, _ = score_one(teacher, client, rollout(seq, 13))
        s2, forwarded = score_one(teacher, client, rollout(seq, 13))
        assert s2.id != s1.id
        assert (s2.scored_tokens, s2.cached_tokens, forwarded) == (0, 64, 0)
        assert np.array_equal(s2.teacher_logprobs_R, s1.teacher_logprobs_R)
        assert np.array_equal(s2.topk_ids_RK, s1.topk_ids_RK)
        assert np.array_equal(s2.topk_logprobs_RK, s1.topk_logprobs_RK)
        assert_matches_fresh(fresh, s2)
        assert ledger.stats(client, Names(NS))["flops_saved_cache"] == 2 * teacher.params * 77
    finally:
        teacher.close()


# ---------------------------------------------------------------------------------------------
# (c) offline warm
# ---------------------------------------------------------------------------------------------


def test_warm_from_ids_then_the_teacher_forwards_nothing(
    tiny_assets: Path, tmp_path: Path, redis_url: str, fresh: HFTeacherScorer, capsys: pytest.CaptureFixture[str]
) -> None:
    t, tr = configs(tiny_assets, tmp_path, redis_url)
    client = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(2)
    v = vocab(tiny_assets)
    shared = random_seq(rng, 32, v)
    seqs = [np.concatenate([shared, random_seq(rng, int(rng.integers(1, 120)), v)]) for _ in range(12)]
    data = tmp_path / "warm.jsonl"
    data.write_text("".join(json.dumps({"ids": s.tolist()}) + "\n" for s in seqs) + "\n")
    assert opd_cli.main(["cache", "warm", "--prompts", str(data), "--ids-only", *cli_sets(t, tr)]) == 0
    out = capsys.readouterr().out
    assert "warm: 12 sequences" in out and re.search(r"cache errors\s+0\n", out), out

    teacher = Teacher(t, tr, worker_id="teacher-b")
    try:
        rollouts = [rollout(s, int(rng.integers(1, len(s)))) for s in seqs]
        before = teacher.scorer.tokens_forwarded
        publish(client, rollouts)
        got = run_until(teacher, client, len(rollouts))
        assert teacher.scorer.tokens_forwarded == before  # not a single teacher forward
        for r in rollouts:
            assert (got[r.id].scored_tokens, got[r.id].cached_tokens) == (0, len(r.response_ids_R))
        assert_matches_fresh(fresh, *got.values())
    finally:
        teacher.close()
    # a second warm of the same data finds everything cached and writes nothing
    assert opd_cli.main(["cache", "warm", "--prompts", str(data), "--json", *cli_sets(t, tr)]) == 0
    totals = json.loads(capsys.readouterr().out)
    assert totals["tokens_cached"] == totals["tokens"] == sum(len(s) for s in seqs)
    assert totals["tokens_forwarded"] == 0 and totals["blocks_written"] == 0


def test_warm_from_text_tokenizes_like_the_actors(tiny_assets: Path, tmp_path: Path, redis_url: str) -> None:
    """Text lines become BOS + prompt (+ response) (+ EOS), the ids an actor's finished rollout has."""
    t, tr = configs(tiny_assets, tmp_path, redis_url)
    client = redis.Redis.from_url(redis_url)
    lines = asset_paths(tiny_assets).prompts_file.read_text().splitlines()[:6]
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert opd_cli.main(["cache", "warm", "--prompts", str(data), "--append-eos", *cli_sets(t, tr)]) == 0

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(asset_paths(tiny_assets).teacher_dir)
    rollouts = []
    for line in lines:
        rec = json.loads(line)
        prompt = [BOS_ID, *tok.encode(rec["prompt"], add_special_tokens=False)]
        response = [*tok.encode(rec["continuation"], add_special_tokens=False), EOS_ID]
        rollouts.append(rollout(np.asarray(prompt + response, np.int32), len(prompt)))
    teacher = Teacher(t, tr, worker_id="teacher-b")
    try:
        publish(client, rollouts)
        got = run_until(teacher, client, len(rollouts))
        assert all(got[r.id].scored_tokens == 0 for r in rollouts), [got[r.id].scored_tokens for r in rollouts]
    finally:
        teacher.close()


# ---------------------------------------------------------------------------------------------
# (d) corruption, (e) index loss
# ---------------------------------------------------------------------------------------------


def _only_shard(cache_dir: Path, writer: str) -> str:
    shards = sorted(p.name for p in (cache_dir / "shards" / writer).iterdir() if p.name[:1].isdigit())
    assert len(shards) == 1, shards
    return f"{writer}/{shards[0]}"


def test_corrupt_chunk_is_recomputed_and_named_by_verify(
    tiny_assets: Path, tmp_path: Path, redis_url: str, fresh: HFTeacherScorer, capsys: pytest.CaptureFixture[str]
) -> None:
    t, tr = configs(tiny_assets, tmp_path, redis_url)
    client = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(3)
    seqs = [random_seq(rng, n, vocab(tiny_assets)) for n in (60, 90, 45)]
    writer = Teacher(t, tr, worker_id="teacher-a")
    try:
        publish(client, [rollout(s, 10) for s in seqs])
        run_until(writer, client, 3)
    finally:
        writer.close()
    shard = _only_shard(Path(t.cache_dir), "teacher-a")
    chunk = Path(t.cache_dir) / "shards" / shard / "logprobs_N" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[16:48] = bytes(range(1, 33))  # just past blosc's 16-byte header: where the used rows are
    chunk.write_bytes(bytes(data))

    reader = Teacher(t, tr, worker_id="teacher-b")  # a fresh process view: nothing decoded in memory
    try:
        rollouts = [rollout(s, 10) for s in seqs]
        publish(client, rollouts)
        got = run_until(reader, client, 6)
        for r in rollouts:  # recomputed, not served
            assert (got[r.id].scored_tokens, got[r.id].cached_tokens) == (len(r.response_ids_R), 0)
        assert_matches_fresh(fresh, *(got[r.id] for r in rollouts))
    finally:
        reader.close()
    assert not read_dead_letters(client, Names(NS))
    capsys.readouterr()
    assert opd_cli.main(["cache", "verify", *cli_sets(t, tr)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS" in out and f"bad shard {shard}" in out, out
    assert "logprobs_N" in out  # the damaged array is named
    # the re-stored copies (teacher-b's shard) are good, so the same prefixes now hit again
    again = Teacher(t, tr, worker_id="teacher-c")
    try:
        s, forwarded = score_one(again, client, rollout(seqs[1], 10))
        assert s.scored_tokens == 0 and forwarded == 0
    finally:
        again.close()


def test_rebuild_index_after_losing_the_redis_index_restores_hits(
    tiny_assets: Path, tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    t, tr = configs(tiny_assets, tmp_path, redis_url)
    client = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(4)
    seqs = [random_seq(rng, n, vocab(tiny_assets)) for n in (50, 70)]
    writer = Teacher(t, tr, worker_id="teacher-a")
    try:
        publish(client, [rollout(s, 5) for s in seqs])
        run_until(writer, client, 2)
        namespace = writer.cache.namespace if writer.cache is not None else ""
    finally:
        writer.close()
    index_key = f"{Names(NS).key('cache')}:index"
    n_fields = client.hlen(index_key)
    assert n_fields > 0
    client.delete(index_key)
    probe = TeacherCache(t.cache_dir, client, k=K, namespace=namespace, block_size=BLOCK,
                         redis_prefix=Names(NS).key("cache"))
    assert probe.missing_start(seqs[0]) == 0  # no index, no hits

    capsys.readouterr()
    assert opd_cli.main(["cache", "rebuild-index", *cli_sets(t, tr)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"index fields added\s+{n_fields:,}\n", out), out
    assert client.hlen(index_key) == n_fields
    assert probe.missing_start(seqs[0]) == len(seqs[0])

    reader = Teacher(t, tr, worker_id="teacher-b")
    try:
        for s in seqs:
            msg, forwarded = score_one(reader, client, rollout(s, 5))
            assert msg.scored_tokens == 0 and forwarded == 0
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# (f) SIGKILL
# ---------------------------------------------------------------------------------------------


def test_sigkilled_teacher_loses_no_message_and_leaves_a_clean_cache(
    tiny_assets: Path, tmp_path: Path, redis_url: str, fresh: HFTeacherScorer, capsys: pytest.CaptureFixture[str]
) -> None:
    t, tr = configs(tiny_assets, tmp_path, redis_url, batch_size=2)
    client = redis.Redis.from_url(redis_url)
    names = Names(NS)
    rng = np.random.default_rng(5)
    v = vocab(tiny_assets)
    # 6 shared 48-token beginnings (24 prompt + 24 response tokens): later rollouts hit the cache
    shared = [random_seq(rng, 48, v) for _ in range(6)]
    rollouts = [rollout(np.concatenate([shared[i % 6], random_seq(rng, int(rng.integers(20, 120)), v)]), 24)
                for i in range(120)]
    publish(client, rollouts)

    cmd = [sys.executable, "-m", "opd.cli", "teacher", "--id", "teacher-k", *cli_sets(t, tr)]
    log_path = tmp_path / "teacher.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while client.xlen(names.scored) < 8:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    done_before = client.xlen(names.scored)
    assert done_before < len(rollouts), "the teacher finished before it could be killed"

    capsys.readouterr()
    assert opd_cli.main(["cache", "verify", *cli_sets(t, tr)]) == 0, capsys.readouterr().out

    # Restart under the same id: it adopts its shard and reclaims what the dead process left pending.
    t8 = t.model_copy(update={"batch_size": 8})
    teacher = Teacher(t8, tr, worker_id="teacher-k")
    try:
        assert teacher.cache is not None and teacher.cache.recovery.shards_seen >= 1
        got_ids = [m.id for m in scored_messages(client)]
        deadline = time.monotonic() + 90
        while len(got_ids) < len(rollouts) or client.xlen(names.rollouts):
            assert time.monotonic() < deadline, f"{len(got_ids)} of {len(rollouts)} scored"
            teacher.step()
            got_ids = [m.id for m in scored_messages(client)]
    finally:
        teacher.close()
    counts = Counter(got_ids)
    assert set(counts) == {r.id for r in rollouts} and max(counts.values()) == 1  # each exactly once
    assert client.xlen(names.rollouts) == 0 and not read_dead_letters(client, names)
    messages = scored_messages(client)
    assert sum(m.cached_tokens for m in messages) > 0
    assert_matches_fresh(fresh, *messages)  # nothing a half-written cache could have served is garbage
    assert opd_cli.main(["cache", "verify", *cli_sets(t, tr)]) == 0


# ---------------------------------------------------------------------------------------------
# cache failures never fail the work
# ---------------------------------------------------------------------------------------------


def test_cache_failures_cost_compute_never_the_work(
    tiny_assets: Path, tmp_path: Path, redis_url: str, fresh: HFTeacherScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    t, tr = configs(tiny_assets, tmp_path, redis_url)
    client = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(6)
    v = vocab(tiny_assets)
    teacher = Teacher(t, tr, worker_id="teacher-a")
    cache = teacher.cache
    assert cache is not None

    def errors(op: str) -> float:
        return teacher.registry.get_sample_value("opd_cache_errors_total", {"op": op}) or 0.0

    try:
        # put raises (disk full): the scores are forwarded all the same, nothing is cached
        def broken_put(items: Any) -> Any:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(cache, "put_many", broken_put)
        a = random_seq(rng, 40, v)
        msg, _ = score_one(teacher, client, rollout(a, 8))
        assert_matches_fresh(fresh, msg)
        assert errors("put") == 1 and teacher.summary.cache_errors == 1
        assert ledger.stats(client, Names(NS))["teacher_cache_errors"] == 1
        monkeypatch.undo()
        assert cache.missing_start(a) == 0

        # lookup raises (Redis hiccup): a miss, the whole sequence is scored
        msg, _ = score_one(teacher, client, rollout(a, 8))  # stores a now
        assert cache.missing_start(a) == len(a)

        def broken_lookup(seqs: Any) -> Any:
            raise redis.ConnectionError("connection reset")

        monkeypatch.setattr(cache, "lookup_many", broken_lookup)
        msg, forwarded = score_one(teacher, client, rollout(a, 8))
        assert (msg.scored_tokens, msg.cached_tokens, forwarded) == (32, 0, 40)
        assert_matches_fresh(fresh, msg)
        assert errors("lookup") == 1
        monkeypatch.undo()

        # one item refused (ValueError): the rest of the batch is still stored
        real_put = cache.put_many
        poison = 3

        def picky_put(items: Any) -> Any:
            if any(int(item[0][1]) == poison for item in items):
                raise ValueError("put item 0: logprobs_T[5] is NaN")
            return real_put(items)

        monkeypatch.setattr(cache, "put_many", picky_put)
        seqs = [random_seq(rng, 30, v) for _ in range(3)]
        seqs[0][1] = poison
        for s in seqs[1:]:
            s[1] = (poison + 1) % v
        rollouts = [rollout(s, 4) for s in seqs]
        publish(client, rollouts)
        run_until(teacher, client, client.xlen(Names(NS).scored) + 3)
        assert errors("put") == 2
        assert cache.missing_start(seqs[0]) == 0
        assert all(cache.missing_start(s) == len(s) for s in seqs[1:])
        assert not read_dead_letters(client, Names(NS))
    finally:
        monkeypatch.undo()
        teacher.close()


def test_teacher_keeps_the_cache_within_its_budget(tiny_assets: Path, tmp_path: Path, redis_url: str) -> None:
    """teacher.cache_budget_bytes: a running teacher evicts old sealed shards (not its own active one)."""
    t, tr = configs(tiny_assets, tmp_path, redis_url, cache_budget_bytes=1, cache_evict_interval_s=0.01)
    client = redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(0)
    old = TeacherCache(t.cache_dir, client, k=K, teacher_identity="an-old-teacher", block_size=BLOCK, writer_id="old",
                       shard_rows=64, redis_prefix=Names(NS).key("cache"))
    for _ in range(6):  # 6 x 48 rows through 64-row shards: several sealed shards
        ids = rng.integers(4, vocab(tiny_assets), size=48, dtype=np.int32)
        lp = np.concatenate([[np.nan], -rng.random(47)]).astype(np.float32)
        old.put(ids, lp, np.zeros((48, K), np.int32), np.full((48, K), -1.0, np.float32), from_pos=0)
    old.close()
    old_dir = Path(t.cache_dir) / "shards" / "old"
    before = len(list(old_dir.iterdir()))
    assert before >= 3
    teacher = Teacher(t, tr, worker_id="teacher-evict")
    try:
        seq = rng.integers(4, vocab(tiny_assets), size=40, dtype=np.int32)
        score_one(teacher, client, rollout(seq, 8))
    finally:
        teacher.close()
    after = list(old_dir.iterdir()) if old_dir.exists() else []
    assert len(after) < before, "the budget was exceeded and nothing was evicted"
    assert client.get(Names(NS).key("cache:evict-lock")) is None
