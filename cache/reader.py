"""The teacher cache's read path: the Redis index says where each block's rows are, the shards serve them
if their checksums hold.

A lookup walks a sequence's chained block keys (`cache.keys`) through the index and serves the longest
prefix whose blocks all read back with their checksums. A block that fails (unreadable chunk, checksum
mismatch) ends what is served, is logged in `<prefix>:corrupt` and loses its index field, so the next
put re-stores it; a block whose shard was evicted under us is an ordinary miss. The write path is
`cache.writer`, the two tied together in `cache.store`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import redis as redis_lib

from cache.index import IndexEntry, RedisNames, delete_index_if_equal
from cache.keys import BlockKey, CacheSpec
from cache.layout import ShardUnavailable, entry_checksum
from cache.root import CacheRoot
from cache.shards import ChunkLRU, Shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheHit:
    """The longest cached prefix of a sequence: positions [0, prefix_len) with their teacher scores.

    logprobs: float32[prefix_len]; topk_ids: int32[prefix_len, K]; topk_logprobs: the cache's top-k
    dtype [prefix_len, K]. Position 0 has no teacher score: NaN logprobs and top-k ids 0.
    `prefix_len` is a block boundary or the full length; the teacher scores [prefix_len, T).
    """

    prefix_len: int
    logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    total_len: int = 0
    blocks: int = 0
    corrupt_blocks: int = 0

    @property
    def hit_tokens(self) -> int:
        return self.prefix_len

    @property
    def logprobs_N(self) -> np.ndarray:
        """Alias of `logprobs` with its shape suffix (N = prefix_len)."""
        return self.logprobs

    @property
    def topk_ids_NK(self) -> np.ndarray:
        return self.topk_ids

    @property
    def topk_logprobs_NK(self) -> np.ndarray:
        return self.topk_logprobs

    @property
    def miss_tokens(self) -> int:
        return self.total_len - self.prefix_len



def _entry_runs(chain: list[tuple[BlockKey, IndexEntry, bytes]]) -> list[list[tuple[BlockKey, IndexEntry, bytes]]]:
    """Split a chain into runs of entries stored back to back in one shard (read in one go)."""
    out: list[list[tuple[BlockKey, IndexEntry, bytes]]] = []
    for item in chain:
        prev = out[-1][-1][1] if out else None
        if prev is not None and prev.shard == item[1].shard and prev.end == item[1].row:
            out[-1].append(item)
        else:
            out.append([item])
    return out


class CacheReader:
    """Lookups of one cache (`spec`): index round trips, chunk reads through `lru`, counters, self-healing.

    `shards` holds the open shard handles, shared with the cache's writer (which adds the shards it
    creates), so that a block just written is read through the same handle.
    """

    def __init__(self, spec: CacheSpec, root: CacheRoot, redis: redis_lib.Redis, names: RedisNames, lru: ChunkLRU,
                 shards: dict[str, Shard]) -> None:
        self.spec = spec
        self.root = root
        self.redis = redis
        self.names = names
        self.lru = lru
        self.shards = shards

    def missing_start(self, ids_T: object) -> int:
        """First position not covered by indexed blocks (index only: no data read, no counters).

        Optimistic: a later `lookup` may still stop earlier if a block fails its checksum.
        """
        blocks = self.spec.keys(ids_T)
        if not blocks:
            return 0
        for bk, raw in zip(blocks, self.redis.hmget(self.names.index, [b.key_hex for b in blocks]), strict=True):
            if raw is None:
                return bk.start
        return blocks[-1].end

    def lookup(self, ids_T: object) -> CacheHit:
        """The longest fully cached, checksum-verified prefix of `ids_T` (see `CacheHit`)."""
        return self.lookup_many([ids_T])[0]

    def lookup_many(self, sequences: Sequence[object]) -> list[CacheHit]:
        """`lookup` for a batch: one index round trip for all sequences, one counter update."""
        all_blocks = [self.spec.keys(s) for s in sequences]
        flat = [b.key_hex for blocks in all_blocks for b in blocks]
        raws = self.redis.hmget(self.names.index, flat) if flat else []
        hits: list[CacheHit] = []
        pos = 0
        served_shards: set[str] = set()
        corrupt_info: list[tuple[str, bytes, str, str]] = []
        for blocks in all_blocks:
            chain: list[tuple[BlockKey, IndexEntry, bytes]] = []
            bad_value = 0
            for bk, raw in zip(blocks, raws[pos : pos + len(blocks)], strict=True):
                if raw is None:
                    break
                try:
                    entry = IndexEntry.unpack(raw)
                except ValueError as exc:
                    corrupt_info.append((bk.key_hex, raw, "", f"bad index value: {exc}"))
                    bad_value = 1
                    break
                if entry.length != bk.length:
                    corrupt_info.append((bk.key_hex, raw, entry.shard, f"length {entry.length} != block {bk.length}"))
                    bad_value = 1
                    break
                chain.append((bk, entry, raw))
            pos += len(blocks)
            hit = self._read_chain(chain, total=blocks[-1].end if blocks else 0, corrupt_info=corrupt_info)
            if bad_value:
                hit = CacheHit(hit.prefix_len, hit.logprobs, hit.topk_ids, hit.topk_logprobs, hit.total_len,
                               hit.blocks, hit.corrupt_blocks + 1)
            served_shards.update(e.shard for _, e, _ in chain[: hit.blocks])
            hits.append(hit)
        self._after_lookup(hits, served_shards, corrupt_info)
        return hits

    def _read_chain(
        self, chain: list[tuple[BlockKey, IndexEntry, bytes]], *, total: int, corrupt_info: list[tuple[str, bytes, str, str]]
    ) -> CacheHit:
        """Serve the chain up to its first bad block; after one, check the rest without serving it.

        Why keep checking: a damaged chunk usually takes several blocks down. Finding them all now
        lets the caller's next put re-store every one of them (their index fields are dropped),
        instead of healing one block per lookup.
        """
        n = chain[-1][0].end if chain else 0
        lp = np.empty(n, np.float32)
        ids = np.empty((n, self.spec.k), np.int32)
        tlp = np.empty((n, self.spec.k), self.spec.topk_dtype)
        served = corrupt = 0
        serving = True
        exists: dict[str, bool] = {}
        for run in _entry_runs(chain):
            for (bk, entry, raw), res in zip(run, self._check_run(run), strict=True):
                if isinstance(res, str):
                    serving = False
                    if entry.shard not in exists:
                        exists[entry.shard] = self.root.shard_exists(entry.shard)
                    if exists[entry.shard]:
                        corrupt += 1
                        corrupt_info.append((bk.key_hex, raw, entry.shard, res))
                    else:  # evicted under us: an ordinary miss, not corruption
                        self.forget_shard(entry.shard)
                elif serving:
                    lp[bk.start : bk.end], ids[bk.start : bk.end], tlp[bk.start : bk.end] = res
                    served += 1
        p = chain[served - 1][0].end if served else 0
        return CacheHit(p, lp[:p], ids[:p], tlp[:p], total, served, corrupt)

    def _check_run(
        self, run: list[tuple[BlockKey, IndexEntry, bytes]]
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | str]:
        """Read entries stored back to back in one shard: per entry its data, or why it is unusable.

        One read for the whole run (the common case: one put's blocks); if that read fails, each
        entry is read alone so that one damaged chunk condemns only the entries that touch it.
        """
        shard_id = run[0][1].shard
        try:
            shard = self.shard(shard_id)
        except ShardUnavailable as exc:
            return [str(exc)] * len(run)
        if shard.k != self.spec.k or shard.topk_dtype != self.spec.topk_dtype:
            return [f"shard holds k={shard.k} {shard.topk_dtype}, cache wants k={self.spec.k} {self.spec.topk_dtype}"] * len(run)
        data: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if len(run) > 1:
            with contextlib.suppress(Exception):  # fall back to per-entry reads below
                data = shard.read_rows(run[0][1].row, run[-1][1].end, self.lru)
        base = run[0][1].row
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray] | str] = []
        for _bk, entry, _raw in run:
            try:
                if data is not None:
                    a, b = entry.row - base, entry.end - base
                    parts = (data[0][a:b], data[1][a:b], data[2][a:b])
                else:
                    parts = shard.read_rows(entry.row, entry.end, self.lru)
                if entry_checksum(*parts) != entry.checksum:
                    # Maybe a stale decoded chunk (the writer appended since): re-read from disk once.
                    self.lru.drop_rows(shard, entry.row, entry.end)
                    parts = shard.read_rows(entry.row, entry.end, self.lru)
            except Exception as exc:  # unreadable chunk or metadata: a miss, never garbage
                out.append(f"read failed: {type(exc).__name__}: {exc}")
                continue
            out.append(parts if entry_checksum(*parts) == entry.checksum else "checksum mismatch")
        return out

    def _after_lookup(self, hits: list[CacheHit], shards: set[str], corrupt_info: list[tuple[str, bytes, str, str]]) -> None:
        """Counters, shard last-hit times, and self-healing of corrupt index entries."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.names.counters, "lookups", len(hits))
        pipe.hincrby(self.names.counters, "hit_tokens", sum(h.hit_tokens for h in hits))
        pipe.hincrby(self.names.counters, "miss_tokens", sum(h.miss_tokens for h in hits))
        corrupt = sum(h.corrupt_blocks for h in hits)
        if corrupt:
            pipe.hincrby(self.names.counters, "corrupt_blocks", corrupt)
        if shards:
            now = time.time()
            pipe.zadd(self.names.shard_hits, dict.fromkeys(shards, now))
        for key_hex, _raw, shard, reason in corrupt_info:
            log.warning("teacher cache: block %s in shard %s unusable (%s); treated as a miss", key_hex, shard, reason)
            pipe.hset(self.names.corrupt, key_hex, msgpack.packb([shard, reason, time.time()]))
        pipe.execute()
        if corrupt_info:
            # Drop the index field so the next put re-stores the block instead of trusting it forever.
            delete_index_if_equal(self.redis, self.names, [(k, raw) for k, raw, _, _ in corrupt_info])

    def shard(self, shard_id: str) -> Shard:
        """An open handle on a shard (kept: the writer registers the shards it creates or resumes here)."""
        shard = self.shards.get(shard_id)
        if shard is None:
            shard = Shard.open(self.root, shard_id)
            self.shards[shard_id] = shard
        return shard

    def forget_shard(self, shard_id: str) -> None:
        """Drop a shard evicted under us: its handle and its decoded chunks."""
        self.shards.pop(shard_id, None)
        self.lru.drop_shard(shard_id)
