"""The teacher cache's on-disk codecs: top-k ids take their bit width, and older shards still read.

Real Zarr shards on disk and a real Redis index; sizes are of the chunk files written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from cache import ops
from cache.layout import SHARDS, TOPK_IDS
from cache.store import TeacherCache

pytestmark = pytest.mark.integration

K = 32
SEQS, LEN = 32, 256  # 8192 rows: exactly one 1 MiB chunk of int32[*, 32] ids


def realistic(vocab: int, seed: int = 0) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Sequences with teacher-like outputs whose top-k ids span a `vocab`-id vocabulary."""
    rng = np.random.default_rng(seed)
    seqs, scores = [], []
    for _ in range(SEQS):
        ids_TK = np.stack([rng.choice(vocab, K, replace=False) for _ in range(LEN)]).astype(np.int32)
        tlp_TK = -np.sort(rng.exponential(1.0, (LEN, K)).cumsum(axis=1), axis=1).astype(np.float32)
        seqs.append(ids_TK[:, 0].copy())
        scores.append((tlp_TK[:, 0].copy(), ids_TK, tlp_TK))
    return seqs, scores


def write(root: Path, redis_url: str, vocab: int) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    seqs, scores = realistic(vocab)
    with TeacherCache(root, redis_url, teacher_identity="t", k=K, writer_id="w") as cache:
        cache.put_many([(s, *sc, 0) for s, sc in zip(seqs, scores, strict=True)])
    return seqs, scores


def ids_array_dir(root: Path) -> Path:
    (shard,) = [p for p in (root / SHARDS / "w").iterdir() if p.is_dir()]
    return shard / TOPK_IDS


def chunk_bytes(array_dir: Path) -> int:
    return sum(f.stat().st_size for f in (array_dir / "c").rglob("*") if f.is_file())


def test_topk_ids_of_a_152k_vocabulary_take_18_bits_each(tmp_path: Path, redis_url: str) -> None:
    """152064 ids need 18 bits (2.25 B). Byte shuffle only drops the zero top byte (~2.5 B per id);
    bit shuffle drops every zero bit plane, which is what keeps k=32 under 200 B/token in float32."""
    write(tmp_path / "c", redis_url, 152_064)
    per_id = chunk_bytes(ids_array_dir(tmp_path / "c")) / (SEQS * LEN * K)
    assert per_id <= 2.3, f"{per_id:.3f} B per top-k id on disk"


def test_shards_written_with_byte_shuffled_ids_still_read(tmp_path: Path, redis_url: str) -> None:
    """A shard from before bit-shuffled ids (its ids array re-encoded with the old codec) serves the same
    values: the codec is read from each array's zarr.json, not assumed."""
    root = tmp_path / "c"
    seqs, scores = write(root, redis_url, 152_064)
    array_dir = ids_array_dir(root)
    group = zarr.open_group(zarr.storage.LocalStore(array_dir.parent), mode="r+")
    old = group[TOPK_IDS]
    data = np.asarray(old[:])
    again = group.create_array(TOPK_IDS, shape=old.shape, dtype=old.dtype, chunks=old.chunks, fill_value=0,
                               compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), overwrite=True)
    again[:] = data
    codecs = json.loads((array_dir / "zarr.json").read_text())["codecs"]
    assert [c["configuration"].get("shuffle") for c in codecs if c["name"] == "blosc"] == ["shuffle"]

    reader = TeacherCache(root, redis_url, teacher_identity="t", k=K)
    for (lp, ids, tlp), hit in zip(scores, reader.lookup_many(seqs), strict=True):
        assert hit.prefix_len == LEN  # position 0 has no teacher score: the cache stores NaN and ids 0 there
        np.testing.assert_array_equal(hit.topk_ids[1:], ids[1:])
        np.testing.assert_array_equal(hit.topk_logprobs[1:], tlp[1:])
        np.testing.assert_array_equal(hit.logprobs[1:], lp[1:])
    assert ops.verify(root, redis_url).ok
