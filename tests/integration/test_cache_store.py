"""The teacher cache against real Redis and real Zarr on disk, with several real processes.

Teacher outputs are a deterministic function of the token *prefix* (an FNV hash of tokens 0..t), so
any process can recompute what a correct entry must hold, and a served value that differs from it
is garbage, whichever writer stored it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from cache import ops
from cache.index import IndexEntry, RedisNames
from cache.keys import block_keys, cache_namespace
from cache.layout import LOGPROBS, TOPK_IDS, CacheError, entry_checksum, pack_records
from cache.shards import Shard
from cache.store import TeacherCache

pytestmark = pytest.mark.integration

IDENTITY = "fake-teacher|rev=0|dtype=float32|temperature=1"
VOCAB = 50_000
B = 16


# ---------------------------------------------------------------------------------------------
# deterministic stand-ins for sequences and teacher outputs
# ---------------------------------------------------------------------------------------------


def fake_scores(ids_T: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logprobs_T, topk_ids_TK, topk_logprobs_TK) as a function of each position's prefix."""
    h_T = np.empty(len(ids_T), np.uint64)
    acc = 1469598103934665603
    for t, x in enumerate(np.asarray(ids_T).tolist()):
        acc = ((acc ^ (int(x) + 1)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
        h_T[t] = acc
    logprobs_T = -((h_T % np.uint64(100_000)).astype(np.float64) / 7_000.0).astype(np.float32)
    ranks_K = np.arange(k, dtype=np.uint64)
    topk_ids_TK = (((h_T[:, None] >> np.uint64(8)) + ranks_K[None, :] * np.uint64(7919)) % np.uint64(VOCAB)).astype(np.int32)
    topk_logprobs_TK = -(ranks_K[None, :].astype(np.float32) * 0.5 + (h_T[:, None] % np.uint64(1000)).astype(np.float32) / 1000)
    return logprobs_T, topk_ids_TK, topk_logprobs_TK.astype(np.float32)


def make_seq(seed: int) -> np.ndarray:
    """A prompt shared by every fifth seed, then a seed-specific response of 50..300 tokens."""
    prompt = np.random.default_rng(10_000 + seed % 5).integers(0, VOCAB, 100)
    rng = np.random.default_rng(seed)
    return np.concatenate([prompt, rng.integers(0, VOCAB, int(rng.integers(50, 300)))]).astype(np.int32)


def check_hit(hit: Any, ids_T: np.ndarray, k: int, topk_dtype: str = "float32") -> bool:
    """True iff the hit's values are exactly what the fake teacher gives for that prefix."""
    p = hit.prefix_len
    lp, ti, tl = fake_scores(ids_T[:p], k)
    if hit.logprobs.shape != (p,) or hit.topk_ids.shape != (p, k) or hit.topk_logprobs.shape != (p, k):
        return False
    if p == 0:
        return True
    return bool(
        np.isnan(hit.logprobs[0])
        and np.array_equal(hit.logprobs[1:], lp[1:])
        and np.array_equal(hit.topk_ids[1:], ti[1:])
        and np.array_equal(hit.topk_logprobs[1:], tl[1:].astype(topk_dtype))
        and hit.topk_logprobs.dtype == np.dtype(topk_dtype)
    )


def score_and_put(cache: TeacherCache, ids_T: np.ndarray) -> tuple[Any, Any]:
    """What a teacher does: look up, 'compute' the missing suffix, store it."""
    hit = cache.lookup(ids_T)
    lp, ti, tl = fake_scores(ids_T, cache.k)
    return hit, cache.put(ids_T, lp, ti, tl, hit.prefix_len)


def open_cache(root: Path | str, redis_url: str, **kw: Any) -> TeacherCache:
    args: dict[str, Any] = {"teacher_identity": IDENTITY, "k": 8, "topk_dtype": "float32", "block_size": B}
    args.update(kw)
    return TeacherCache(root, redis_url, **args)


# ---------------------------------------------------------------------------------------------
# processes (module level so that spawn can import them)
# ---------------------------------------------------------------------------------------------


def writer_proc(root: str, redis_url: str, writer_id: str, seeds: list[int], out: Any) -> None:
    cache = open_cache(root, redis_url, writer_id=writer_id, topk_dtype="float16", shard_rows=2048)
    blocks = tokens = bad = 0
    for seed in seeds:
        ids = make_seq(seed)
        hit, res = score_and_put(cache, ids)
        bad += not check_hit(hit, ids, 8, "float16")
        blocks += res.blocks_written
        tokens += res.tokens_written
    cache.close()
    out.put(("writer", writer_id, blocks, tokens, bad))


def reader_proc(root: str, redis_url: str, universe: list[int], stop: Any, out: Any) -> None:
    cache = open_cache(root, redis_url, topk_dtype="float16")
    rng = random.Random(0)
    lookups = hits = bad = 0
    while not stop.is_set():
        seed = rng.choice(universe)
        ids = make_seq(seed)
        hit = cache.lookup(ids)
        lookups += 1
        hits += hit.prefix_len > 0
        bad += not check_hit(hit, ids, 8, "float16")
    out.put(("reader", lookups, hits, bad))


def looping_writer_proc(root: str, redis_url: str, writer_id: str, first_seed: int) -> None:
    cache = open_cache(root, redis_url, writer_id=writer_id, shard_rows=4096)
    seed = first_seed
    while True:
        score_and_put(cache, make_seq(seed))
        seed += 1


def torn_writer_proc(root: str, redis_url: str, ready: Any) -> None:
    """Store A normally; B's rows and records but no index field; then unreferenced junk rows. Then wait."""
    cache = open_cache(root, redis_url, writer_id="torn")
    score_and_put(cache, make_seq(1))
    shard = cache.writer.active
    assert shard is not None
    ids_b = make_seq(2)
    lp, ti, tl = fake_scores(ids_b, 8)
    lp[0], ti[0], tl[0] = np.nan, 0, np.nan
    row, rec = cache.writer.next_row, cache.writer.next_record
    records = []
    for bk in block_keys(ids_b, B, cache.namespace):
        part = (lp[bk.start : bk.end], ti[bk.start : bk.end], tl[bk.start : bk.end])
        shard.write_rows(row + bk.start, *part)
        records.append((bk.key_hex, row + bk.start, bk.length, entry_checksum(*part)))
    shard.write_records(rec, pack_records(records))
    junk = np.random.default_rng(0)
    end = row + len(ids_b)
    shard.write_rows(end, junk.random(50, np.float32), junk.integers(0, 9, (50, 8), np.int32), junk.random((50, 8), np.float32))
    ready.set()
    time.sleep(600)


def spawn() -> Any:
    return mp.get_context("spawn")


# ---------------------------------------------------------------------------------------------
# single process
# ---------------------------------------------------------------------------------------------


def test_put_lookup_round_trip_exact(tmp_path: Path, redis_url: str) -> None:
    cache = open_cache(tmp_path / "c", redis_url, writer_id="w")
    ids = make_seq(0)
    t = len(ids)
    assert cache.missing_start(ids) == 0
    hit, res = score_and_put(cache, ids)
    assert (hit.prefix_len, hit.hit_tokens, hit.miss_tokens) == (0, 0, t)
    n_blocks = -(-t // B)
    assert (res.blocks_written, res.tokens_written, res.blocks_cached, res.blocks_skipped) == (n_blocks, t, 0, 0)
    assert res.bytes_written == t * (4 + 8 * 8) + n_blocks * 36

    hit = cache.lookup(ids)
    assert (hit.prefix_len, hit.blocks, hit.hit_tokens, hit.miss_tokens, hit.corrupt_blocks) == (t, n_blocks, t, 0, 0)
    assert check_hit(hit, ids, 8)
    assert hit.logprobs.dtype == np.float32 and hit.topk_ids.dtype == np.int32
    assert cache.missing_start(ids) == t

    # A second reader (fresh process state, no chunk cache) sees the same bytes.
    reader = open_cache(tmp_path / "c", redis_url, read_cache_bytes=0)
    assert check_hit(reader.lookup(ids), ids, 8) and reader.lookup(ids).prefix_len == t

    # Storing it again writes nothing.
    assert score_and_put(cache, ids)[1].blocks_written == 0

    st = ops.stats(tmp_path / "c", redis_url)
    assert (st.entries, st.indexed_tokens, st.stored_entries, st.stored_tokens) == (n_blocks, t, n_blocks, t)
    assert st.counters["hit_tokens"] == 4 * t and st.counters["miss_tokens"] == t
    assert st.counters["tokens_written"] == t and st.bytes_on_disk > 0 and st.bytes_per_token > 0
    cache.close()


def test_shared_prefix_stores_only_new_blocks(tmp_path: Path, redis_url: str) -> None:
    cache = open_cache(tmp_path / "c", redis_url, writer_id="w")
    rng = np.random.default_rng(1)
    a = rng.integers(0, VOCAB, 300).astype(np.int32)
    b = np.concatenate([a[:200], rng.integers(0, VOCAB, 100)]).astype(np.int32)
    score_and_put(cache, a)
    shared = 200 // B * B  # 192: the block [192, 208) differs
    hit_b, res_b = score_and_put(cache, b)
    assert hit_b.prefix_len == shared and check_hit(hit_b, b, 8)
    assert res_b.tokens_written == 300 - shared
    assert res_b.blocks_written == -(-(300 - shared) // B)
    assert res_b.blocks_cached == shared // B
    st = ops.stats(tmp_path / "c", redis_url)
    assert st.stored_tokens == 300 + (300 - shared)  # rows written in all

    for seq in (a, b):
        hit = cache.lookup(seq)
        assert hit.prefix_len == 300 and check_hit(hit, seq, 8)
    c = np.concatenate([b[:250], rng.integers(0, VOCAB, 40)]).astype(np.int32)
    assert cache.lookup(c).prefix_len == 240 and cache.missing_start(c) == 240
    cache.close()


def test_batched_put_and_lookup_store_shared_blocks_once(tmp_path: Path, redis_url: str) -> None:
    cache = open_cache(tmp_path / "c", redis_url, writer_id="w")
    seqs = [make_seq(s) for s in (0, 5, 10, 1)]  # seeds 0, 5, 10 share a 100-token prompt
    results = cache.put_many([(ids, *fake_scores(ids, 8), 0) for ids in seqs])
    shared = 100 // B
    assert [r.blocks_cached for r in results] == [0, shared, shared, 0]
    assert sum(r.tokens_written for r in results) == sum(len(s) for s in seqs) - 2 * shared * B
    hits = cache.lookup_many(seqs)
    assert all(h.prefix_len == len(s) and check_hit(h, s, 8) for h, s in zip(hits, seqs, strict=True))
    cache.close()


def test_incomplete_shard_from_a_crash_during_creation(tmp_path: Path, redis_url: str) -> None:
    import zarr

    root = tmp_path / "c"
    with open_cache(root, redis_url, writer_id="w") as cache:
        score_and_put(cache, make_seq(0))
    zarr.create_group(str(root), path="shards/w/000099-deadbeef", attributes={"format": "opd-teacher-cache-shard", "ready": False})
    report = ops.verify(root, redis_url)
    assert report.ok and report.incomplete_shards == ["w/000099-deadbeef"], report.summary()
    with open_cache(root, redis_url, writer_id="w") as cache:
        assert cache.recovery.removed_incomplete == ["w/000099-deadbeef"]
        assert cache.lookup(make_seq(0)).prefix_len == len(make_seq(0))
    assert ops.verify(root, redis_url).incomplete_shards == []


def test_put_respects_from_pos_and_skips_unreachable_blocks(tmp_path: Path, redis_url: str) -> None:
    cache = open_cache(tmp_path / "c", redis_url, writer_id="w")
    ids = make_seq(3)
    lp, ti, tl = fake_scores(ids, 8)
    # The caller computed only from 40: blocks from 48 on are complete but unreachable (0..47 missing).
    res = cache.put(ids, lp, ti, tl, 40)
    assert res.blocks_written == 0 and res.blocks_skipped == -(-len(ids) // B)
    # from_pos=1 covers block 0 (position 0 never has a score).
    res = cache.put(ids, lp, ti, tl, 1)
    assert res.blocks_written == -(-len(ids) // B)
    assert check_hit(cache.lookup(ids), ids, 8)
    cache.close()


def test_k0_stores_only_logprobs(tmp_path: Path, redis_url: str) -> None:
    cache = open_cache(tmp_path / "c", redis_url, writer_id="w", k=0)
    ids = make_seq(4)
    lp, _, _ = fake_scores(ids, 0)
    res = cache.put(ids, lp, None, None, 0)
    assert res.bytes_written == len(ids) * 4 + res.blocks_written * 36
    hit = cache.lookup(ids)
    assert hit.prefix_len == len(ids) and check_hit(hit, ids, 0)
    assert hit.topk_ids.shape == (len(ids), 0)
    shard = Shard.open(cache.root, cache.active_shard or "")
    assert sorted(shard.arrays) == ["logprobs_N", "records_NR"]
    # Explicit empty arrays are accepted too.
    ids2 = make_seq(5)
    lp2, ti2, tl2 = fake_scores(ids2, 0)
    assert cache.put(ids2, lp2, ti2, tl2, 0).tokens_written == len(ids2)
    assert ops.verify(tmp_path / "c", redis_url).ok
    cache.close()


def test_float16_topk(tmp_path: Path, redis_url: str) -> None:
    cache = open_cache(tmp_path / "c", redis_url, writer_id="w", k=32, topk_dtype="float16")
    ids = make_seq(6)
    score_and_put(cache, ids)
    hit = cache.lookup(ids)
    assert hit.topk_logprobs.dtype == np.float16 and hit.topk_ids.shape == (len(ids), 32)
    assert check_hit(hit, ids, 32, "float16")
    assert cache.put(ids, *fake_scores(ids, 32), 0).bytes_written == 0
    cache.close()


def test_teachers_and_k_never_share_entries(tmp_path: Path, redis_url: str) -> None:
    root = tmp_path / "c"
    ids = make_seq(7)
    with open_cache(root, redis_url, writer_id="a") as a:
        score_and_put(a, ids)
    for kw in ({"teacher_identity": "another-teacher"}, {"k": 4}, {"topk_dtype": "float16"}):
        assert open_cache(root, redis_url, **kw).lookup(ids).prefix_len == 0
    assert open_cache(root, redis_url).lookup(ids).prefix_len == len(ids)
    # The same namespace given ready-made (and the dtype as a numpy dtype) reads the same entries.
    same = TeacherCache(root, redis_url, namespace=cache_namespace(IDENTITY, 8, "float32"), k=8,
                        topk_dtype=np.dtype(np.float32), block_size=B)
    hit = same.lookup(ids)
    assert hit.prefix_len == len(ids) and hit.logprobs_N is hit.logprobs and hit.topk_ids_NK.shape == (len(ids), 8)
    with pytest.raises(ValueError, match="must come from cache_namespace"):
        TeacherCache(root, redis_url, namespace=cache_namespace(IDENTITY, 8, "float32"), k=4, block_size=B)
    with pytest.raises(ValueError, match="exactly one of"):
        TeacherCache(root, redis_url, k=8)


def test_bad_input_is_refused_with_a_clear_error(tmp_path: Path, redis_url: str) -> None:
    cache = open_cache(tmp_path / "c", redis_url, writer_id="w")
    ids = make_seq(8)
    t = len(ids)
    lp, ti, tl = fake_scores(ids, 8)
    cases: list[tuple[tuple[Any, ...], str]] = [
        ((ids, lp[:-1], ti, tl, 0), "logprobs_T must be float"),
        ((ids, lp, ti[:, :4], tl, 0), "topk_ids_TK must be int"),
        ((ids, lp, ti.astype(np.float32), tl, 0), "topk_ids_TK must be int"),
        ((ids, lp, ti, tl[:5], 0), "topk_logprobs_TK must be float"),
        ((ids, lp, ti, tl, t + 1), "from_pos must be"),
        ((ids, lp, ti, tl, -1), "from_pos must be"),
        ((ids.reshape(1, -1), lp, ti, tl, 0), "ids_T must be 1-D"),
        ((ids, np.where(np.arange(t) == 7, np.nan, lp), ti, tl, 0), r"logprobs_T\[7\] is NaN"),
        ((ids, lp, ti - 10**6, tl, 0), "outside"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            cache.put(*args)
    with pytest.raises(CacheError, match="read-only"):
        open_cache(tmp_path / "c", redis_url).put(ids, lp, ti, tl, 0)
    with pytest.raises(CacheError, match="held by another live process"):
        open_cache(tmp_path / "c", redis_url, writer_id="w", lock_timeout_s=0.1)
    for kw, match in (({"topk_dtype": "bfloat16"}, "topk_dtype"), ({"block_size": 0}, "block_size"),
                      ({"writer_id": "a/b"}, "writer_id"), ({"compression": "gzip"}, "compression"),
                      ({"shard_rows": 8}, "shard_rows")):
        with pytest.raises(ValueError, match=match):
            open_cache(tmp_path / "c", redis_url, **kw)
    assert ops.verify(tmp_path / "c", redis_url).entries == 0
    cache.close()


def test_fsspec_url_root(redis_url: str) -> None:
    """An fsspec URL goes through zarr's FsspecStore (no flock, no fsync): same behaviour otherwise."""
    url = f"memory://opd-cache-{os.getpid()}-{time.monotonic_ns()}"
    cache = open_cache(url, redis_url, writer_id="w", shard_rows=128)
    seqs = [make_seq(s) for s in range(3)]
    for ids in seqs:
        score_and_put(cache, ids)
    for ids in seqs:
        hit = cache.lookup(ids)
        assert hit.prefix_len == len(ids) and check_hit(hit, ids, 8)
    report = ops.verify(url, redis_url)
    assert report.ok and report.shards > 1, report.summary()


# ---------------------------------------------------------------------------------------------
# several processes, crashes, damage, rebuild, eviction
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_writer_processes_and_reader(tmp_path: Path, redis_url: str) -> None:
    root = str(tmp_path / "c")
    ctx = spawn()
    out = ctx.Queue()
    stop = ctx.Event()
    plan = {f"w{i}": list(range(i * 15, i * 15 + 25)) for i in range(3)}  # neighbours overlap by 10 seeds
    universe = sorted({s for seeds in plan.values() for s in seeds})
    open_cache(root, redis_url).close()  # create the root once, up front
    reader = ctx.Process(target=reader_proc, args=(root, redis_url, universe, stop, out))
    writers = [ctx.Process(target=writer_proc, args=(root, redis_url, w, seeds, out)) for w, seeds in plan.items()]
    reader.start()
    for p in writers:
        p.start()
    results = [out.get(timeout=300) for _ in writers]
    for p in writers:
        p.join(timeout=60)
        assert p.exitcode == 0
    stop.set()
    reader_result = out.get(timeout=60)
    reader.join(timeout=60)
    assert reader.exitcode == 0

    assert all(bad == 0 for *_, bad in results), results
    _, lookups, _, reader_bad = reader_result
    assert lookups > 0 and reader_bad == 0, reader_result

    report = ops.verify(root, redis_url)
    assert report.ok and not report.unindexed and report.torn_records == 0, report.summary()

    check = open_cache(root, redis_url, topk_dtype="float16", read_cache_bytes=0)
    all_keys: set[str] = set()
    for seed in universe:
        ids = make_seq(seed)
        hit = check.lookup(ids)
        assert hit.prefix_len == len(ids) and check_hit(hit, ids, 8, "float16")
        all_keys |= {bk.key_hex for bk in check.keys(ids)}
    index = redis.Redis.from_url(redis_url).hgetall(RedisNames().index)
    assert {k.decode() for k in index} == all_keys  # no entry lost, none invented
    st = ops.stats(root, redis_url)
    assert st.stored_entries == sum(r[2] for r in results)  # every block a writer reported is on disk
    assert st.stored_tokens == sum(r[3] for r in results)
    assert st.stored_entries >= len(all_keys) and st.shards > 3  # shards rolled over under load


@pytest.mark.slow
def test_sigkill_mid_write_leaves_nothing_torn(tmp_path: Path, redis_url: str) -> None:
    root = str(tmp_path / "c")
    ctx = spawn()
    client = redis.Redis.from_url(redis_url)
    names = RedisNames()
    rng = random.Random(1)
    for round_ in range(3):
        before = client.hlen(names.index)
        proc = ctx.Process(target=looping_writer_proc, args=(root, redis_url, "victim", round_ * 1000))
        proc.start()
        deadline = time.monotonic() + 120
        while client.hlen(names.index) < before + 40:
            assert time.monotonic() < deadline and proc.is_alive(), "writer made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL

        report = ops.verify(root, redis_url)
        assert report.ok and report.torn_records == 0, report.summary()
        reader = open_cache(root, redis_url, read_cache_bytes=0)
        for seed in range(round_ * 1000, round_ * 1000 + 200):
            ids = make_seq(seed)
            assert check_hit(reader.lookup(ids), ids, 8), f"garbage served for seed {seed}"

    # A restarted writer (same id) adopts its shard and reuses every complete entry.
    cache = open_cache(root, redis_url, writer_id="victim", shard_rows=4096)
    # The last kill may land mid roll-over: the old shard already sealed, the new one not yet created
    # (nothing to resume) or half-created (removed). Any other outcome adopts or seals the open shard.
    rec = cache.recovery
    assert rec.shards_seen >= 1, rec
    if rec.resumed_shard is None:  # then no shard of the victim may be left open
        victims = [Shard.open(cache.writer.root, sid) for sid in cache.writer.root.list_shards("victim")]
        active = cache.writer.active.shard_id if cache.writer.active is not None else None
        assert all(s.sealed or s.shard_id == active for s in victims), rec
    reused = 0
    for round_ in range(3):
        for seed in range(round_ * 1000, round_ * 1000 + 200):
            ids = make_seq(seed)
            hit, res = score_and_put(cache, ids)
            assert check_hit(hit, ids, 8)
            if hit.prefix_len == len(ids):
                assert res.blocks_written == 0
                reused += 1
            assert check_hit(cache.lookup(ids), ids, 8) and cache.lookup(ids).prefix_len == len(ids)
    assert reused > 0
    report = ops.verify(root, redis_url)
    assert report.ok and not report.unindexed, report.summary()
    cache.close()


def test_killed_writer_restart_reindexes_records_and_overwrites_junk(tmp_path: Path, redis_url: str) -> None:
    root = str(tmp_path / "c")
    ctx = spawn()
    ready = ctx.Event()
    proc = ctx.Process(target=torn_writer_proc, args=(root, redis_url, ready))
    proc.start()
    assert ready.wait(120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)

    a, b, c = make_seq(1), make_seq(2), make_seq(3)
    b_keys = {bk.key_hex for bk in block_keys(b, B, open_cache(root, redis_url).namespace)}
    report = ops.verify(root, redis_url)
    assert report.ok, report.summary()
    assert set(report.unindexed) == b_keys  # B's records exist, its index fields never got written
    reader = open_cache(root, redis_url)
    assert reader.lookup(a).prefix_len == len(a) and reader.lookup(b).prefix_len == 0

    cache = open_cache(root, redis_url, writer_id="torn")
    assert cache.recovery.reindexed == len(b_keys)
    assert cache.recovery.resumed_rows == len(a) + len(b)  # the junk rows after B are not "used"
    hit = cache.lookup(b)
    assert hit.prefix_len == len(b) and check_hit(hit, b, 8)
    assert score_and_put(cache, b)[1].blocks_written == 0
    score_and_put(cache, c)  # lands on the junk rows
    assert check_hit(cache.lookup(c), c, 8) and cache.lookup(c).prefix_len == len(c)
    report = ops.verify(root, redis_url)
    assert report.ok and not report.unindexed, report.summary()
    cache.close()


def _damage(path: Path, how: str, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        at = offset if offset else len(data) // 2
        data[at : at + 32] = bytes(range(1, 33))
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(("compression", "array", "how"), [
    ("blosc-lz4", TOPK_IDS, "truncate"),
    ("blosc-lz4", LOGPROBS, "overwrite"),
    ("none", LOGPROBS, "overwrite"),
])
def test_corrupt_chunk_is_named_by_verify_and_missed_by_lookup(
    tmp_path: Path, redis_url: str, compression: str, array: str, how: str
) -> None:
    root = tmp_path / "c"
    cache = open_cache(root, redis_url, writer_id="w", compression=compression)
    x, y = make_seq(11), make_seq(12)
    score_and_put(cache, x)
    score_and_put(cache, y)
    shard = cache.writer.active
    assert shard is not None
    chunk_key = shard.chunk_key(array, 0)
    # Uncompressed chunks: hit row 20 exactly (x's second block); compressed: any damage kills the chunk.
    _damage(root / chunk_key, how, offset=20 * 4 if compression == "none" else 0)

    report = ops.verify(root, redis_url)
    assert not report.ok and report.bad
    assert all(chunk_key in b.reason and b.shard == shard.shard_id and b.indexed for b in report.bad), report.summary()
    x_keys = [bk.key_hex for bk in cache.keys(x)]
    bad_keys = {b.key_hex for b in report.bad}
    if compression == "none":
        assert bad_keys == {x_keys[1]}  # only the entry whose bytes changed
    else:
        assert set(x_keys) <= bad_keys

    reader = open_cache(root, redis_url, read_cache_bytes=0)
    hit = reader.lookup(x)
    expected = B if compression == "none" else 0
    n_bad = 1 if compression == "none" else len(x_keys)  # a chunk that cannot be decoded takes all of x
    assert hit.prefix_len == expected and hit.corrupt_blocks == n_bad and check_hit(hit, x, 8)
    if compression == "none":
        assert reader.lookup(y).prefix_len == len(y)
    counters = redis.Redis.from_url(redis_url).hgetall(RedisNames().counters)
    assert int(counters[b"corrupt_blocks"]) == n_bad
    assert x_keys[expected // B] in ops.decode_corrupt_log(redis.Redis.from_url(redis_url))
    # Every bad block's index field is gone, so the teacher recomputes and re-stores them (in a new
    # shard if the damaged chunk cannot even be merged into).
    assert reader.missing_start(x) == expected
    hit, res = score_and_put(cache, x)
    assert res.blocks_written == n_bad and res.blocks_cached == len(x_keys) - n_bad
    hit = reader.lookup(x)
    assert hit.prefix_len == len(x) and check_hit(hit, x, 8)
    rebuilt = ops.rebuild_index(root, redis_url)
    assert rebuilt.bad_skipped >= 1
    assert check_hit(reader.lookup(x), x, 8) and reader.lookup(x).prefix_len == len(x)
    cache.close()


def test_rebuild_index_from_shards_alone(tmp_path: Path, redis_url: str) -> None:
    root = tmp_path / "c"
    cache = open_cache(root, redis_url, writer_id="w", shard_rows=512)
    seqs = [make_seq(s) for s in range(20)]
    for ids in seqs:
        score_and_put(cache, ids)
    client = redis.Redis.from_url(redis_url)
    names = RedisNames()
    snapshot = client.hgetall(names.index)
    distinct = {bk.key_hex for ids in seqs for bk in cache.keys(ids)}
    assert {k.decode() for k in snapshot} == distinct
    assert len(distinct) == sum(-(-len(s) // B) for s in seqs) - 5 * 3 * (100 // B)  # shared prompt blocks once
    client.delete(names.index)
    assert all(cache.lookup(ids).prefix_len == 0 for ids in seqs)
    assert not ops.verify(root, redis_url).ok or ops.verify(root, redis_url).unindexed

    report = ops.rebuild_index(root, redis_url)
    assert report.added == len(snapshot) and report.removed == report.replaced == 0 and report.shards > 3
    assert client.hgetall(names.index) == snapshot
    for ids in seqs:
        hit = cache.lookup(ids)
        assert hit.prefix_len == len(ids) and check_hit(hit, ids, 8)
    # A field pointing nowhere is removed; running it again changes nothing else.
    client.hset(names.index, "00" * 16, IndexEntry("w/999999-dead", 0, 16, 1).pack())
    again = ops.rebuild_index(root, redis_url)
    assert (again.added, again.replaced, again.removed, again.kept) == (0, 0, 1, len(snapshot))
    assert ops.verify(root, redis_url).ok
    cache.close()


def test_evict_respects_budget_and_removes_least_recently_hit_first(tmp_path: Path, redis_url: str) -> None:
    root = tmp_path / "c"
    cache = open_cache(root, redis_url, writer_id="w", shard_rows=256)
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, VOCAB, 256).astype(np.int32) for _ in range(12)]  # exactly one shard each
    shard_of: list[str] = []
    for ids in seqs:
        score_and_put(cache, ids)
        shard_of.append(IndexEntry.unpack(redis.Redis.from_url(redis_url).hget(RedisNames().index, cache.keys(ids)[0].key_hex)).shard)
    assert len(set(shard_of)) == 12 and cache.active_shard == shard_of[-1]
    for i in (5, 2, 9):  # hit order: 9 is the most recent
        time.sleep(0.01)
        assert cache.lookup(seqs[i]).prefix_len == 256

    sizes = {sid: cache.root.shard_nbytes(sid) for sid in shard_of}
    total = sum(sizes.values())
    expected_order = [shard_of[i] for i in (0, 1, 3, 4)]  # never hit, oldest first
    budget = total - sum(sizes[s] for s in expected_order[:3]) - sizes[expected_order[3]] // 2
    dry = ops.evict(root, redis_url, budget, dry_run=True)
    assert [r.shard for r in dry.removed] == expected_order and all(cache.root.shard_exists(s) for s in shard_of)

    report = ops.evict(root, redis_url, budget)
    assert [r.shard for r in report.removed] == expected_order
    assert report.bytes_before == total and report.bytes_after <= budget and not report.over_budget
    assert report.bytes_after == ops.stats(root, redis_url).bytes_on_disk
    assert all(r.index_fields_removed == 16 for r in report.removed)
    reader = open_cache(root, redis_url)
    for i, ids in enumerate(seqs):
        hit = reader.lookup(ids)
        assert hit.prefix_len == (0 if i in (0, 1, 3, 4) else 256) and hit.corrupt_blocks == 0
    assert ops.verify(root, redis_url).ok

    # Budget 0: every sealed shard goes, least recently hit first (the check loop above just hit
    # them in index order); the live writer's active shard stays.
    report = ops.evict(root, redis_url, 0)
    assert [r.shard for r in report.removed] == [shard_of[i] for i in (2, 5, 6, 7, 8, 9, 10)]
    assert report.active_kept == [shard_of[11]] and report.over_budget
    cache.close()  # the writer is gone: its shard is no longer protected
    report = ops.evict(root, redis_url, 0)
    assert [r.shard for r in report.removed] == [shard_of[11]] and report.bytes_after == 0
    assert redis.Redis.from_url(redis_url).hlen(RedisNames().index) == 0
    assert ops.verify(root, redis_url).ok
