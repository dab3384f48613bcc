"""The teacher's content-addressed logprob cache: Zarr shards on disk, a Redis index for speed.

The two halves live in their own modules: the on-disk half in `cache.layout` (names, fixed-width
manifest records, checksums), `cache.root` (one writer per shard, writer locks) and `cache.shards`
(one shard's arrays, the decoded-chunk LRU), and `cache.index` (the Redis index, which is
only an index: the shards are the source of truth). `TeacherCache` here ties them together.

Why this write order: rows are written (and fsynced) first, then the entry's manifest record, then
the Redis index field, and a shard is sealed only after all its records are indexed. An entry is
therefore visible (indexed) only once its bytes are durable, and a writer killed at any point leaves
unreferenced rows (no record: ignored, and overwritten when the writer resumes), records without an
index field (only ever in the active shard, which the restarted writer re-indexes; or use
`ops.rebuild_index`), or a shard whose creation never finished (no entries; the restarted writer
deletes it). A torn or corrupted chunk fails its CRC and reads as a miss, never as garbage (see
`cache.layout`).

Values: row t of an entry covering positions [start, end) holds the score of token t given all
tokens before it. Position 0 has no teacher score: its row holds NaN logprobs and top-k ids 0.

A `TeacherCache` is not thread-safe: use one per thread (processes are the unit of concurrency).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgpack
import numpy as np
import redis as redis_lib

from cache.index import DEFAULT_REDIS_PREFIX, IndexEntry, RedisNames, connect_redis, delete_index_if_equal
from cache.keys import BlockKey, as_token_ids, block_keys, cache_namespace
from cache.layout import (
    RECORD_BYTES,
    TOPK_DTYPES,
    CacheError,
    ShardUnavailable,
    compressors,
    entry_checksum,
    pack_records,
    validate_writer_id,
)
from cache.root import CacheRoot, WriterLock
from cache.shards import ChunkLRU, RecordScan, Shard

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


@dataclass(frozen=True)
class PutResult:
    """What one `put` stored: new blocks/rows/bytes (payload + records, before compression).

    blocks_cached: already in the index (or stored earlier in the same batch); blocks_skipped: not
    computed by the caller (before `from_pos`) or unreachable because an earlier block is missing.
    """

    blocks_written: int = 0
    tokens_written: int = 0
    bytes_written: int = 0
    blocks_cached: int = 0
    blocks_skipped: int = 0


@dataclass(frozen=True)
class RecoveryReport:
    """What a writer found of its previous incarnation when it started."""

    shards_seen: int = 0
    resumed_shard: str | None = None
    resumed_rows: int = 0
    reindexed: int = 0
    sealed: list[str] = field(default_factory=list)
    removed_incomplete: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    """One block chosen for writing in a put batch."""

    item: int
    block: BlockKey


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


class TeacherCache:
    """Content-addressed cache of teacher scores keyed by chained token blocks (see module docs).

    Reader-only when `writer_id` is None; a writer holds `writer_id` exclusively (flock on local
    roots) and, on start, recovers its previous incarnation's shard: records without an index
    field are re-indexed, rows without a record are left unreferenced and overwritten.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        redis: redis_lib.Redis | str,
        *,
        k: int,
        teacher_identity: str | None = None,
        namespace: str | None = None,
        topk_dtype: str | np.dtype = "float32",
        block_size: int = 16,
        writer_id: str | None = None,
        shard_rows: int = 1 << 20,
        chunk_bytes: int = 1 << 20,
        compression: str = "blosc-lz4",
        fsync: bool = True,
        read_cache_bytes: int = 256 << 20,
        redis_prefix: str = DEFAULT_REDIS_PREFIX,
        storage_options: dict[str, Any] | None = None,
        lock_timeout_s: float = 10.0,
    ) -> None:
        try:
            dtype_name = np.dtype(topk_dtype).name
        except TypeError as exc:
            raise ValueError(f"topk_dtype must be one of {TOPK_DTYPES}, got {topk_dtype!r}") from exc
        if dtype_name not in TOPK_DTYPES:
            raise ValueError(f"topk_dtype must be one of {TOPK_DTYPES}, got {topk_dtype!r}")
        for name, value, low in (("block_size", block_size, 1), ("shard_rows", shard_rows, 1),
                                 ("chunk_bytes", chunk_bytes, 1), ("read_cache_bytes", read_cache_bytes, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if shard_rows < block_size:
            raise ValueError(f"shard_rows ({shard_rows}) must be >= block_size ({block_size}): a block never spans shards")
        compressors(compression)
        if (teacher_identity is None) == (namespace is None):
            raise ValueError("pass exactly one of teacher_identity or namespace (from cache.keys.cache_namespace)")
        if namespace is None:
            self.namespace = cache_namespace(str(teacher_identity), k, dtype_name)
        else:
            suffix = cache_namespace("x", k, dtype_name)[1:]
            if not isinstance(namespace, str) or not namespace.endswith(suffix) or len(namespace) == len(suffix):
                raise ValueError(
                    f"namespace {namespace!r} must come from cache_namespace(identity, k={k}, topk_dtype={dtype_name}): "
                    f"entries of a different k or top-k dtype must never be shared"
                )
            self.namespace = namespace
        self.k = int(k)
        self.topk_dtype = np.dtype(dtype_name)
        self.block_size = block_size
        self.shard_rows = shard_rows
        self.chunk_bytes = chunk_bytes
        self.compression = compression
        self.fsync = fsync
        self.names = RedisNames(redis_prefix)
        self.redis = connect_redis(redis)
        self.root = CacheRoot(root, create=True, storage_options=storage_options)
        self.lru = ChunkLRU(read_cache_bytes)
        self.writer_id = None if writer_id is None else validate_writer_id(writer_id)
        self._shards: dict[str, Shard] = {}
        self._active: Shard | None = None
        self._next_row = 0
        self._next_record = 0
        self._lock: WriterLock | None = None
        self._closed = False
        self.recovery = RecoveryReport()
        if self.writer_id is not None:
            self._lock = self.root.acquire_writer_lock(self.writer_id, lock_timeout_s)
            try:
                self.recovery = self._recover()
            except BaseException:
                self.close()
                raise

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the writer lock. The active shard stays unsealed so a restart resumes it."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._active = None
        self._closed = True

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def active_shard(self) -> str | None:
        return None if self._active is None else self._active.shard_id

    def keys(self, ids_T: object) -> list[BlockKey]:
        return block_keys(ids_T, self.block_size, self.namespace)

    # -- lookup --------------------------------------------------------------------------------

    def missing_start(self, ids_T: object) -> int:
        """First position not covered by indexed blocks (index only: no data read, no counters).

        Optimistic: a later `lookup` may still stop earlier if a block fails its checksum.
        """
        blocks = self.keys(ids_T)
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
        all_blocks = [self.keys(s) for s in sequences]
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
        ids = np.empty((n, self.k), np.int32)
        tlp = np.empty((n, self.k), self.topk_dtype)
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
                        self._forget_shard(entry.shard)
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
            shard = self._shard(shard_id)
        except ShardUnavailable as exc:
            return [str(exc)] * len(run)
        if shard.k != self.k or shard.topk_dtype != self.topk_dtype:
            return [f"shard holds k={shard.k} {shard.topk_dtype}, cache wants k={self.k} {self.topk_dtype}"] * len(run)
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

    def _shard(self, shard_id: str) -> Shard:
        shard = self._shards.get(shard_id)
        if shard is None:
            shard = Shard.open(self.root, shard_id)
            self._shards[shard_id] = shard
        return shard

    def _forget_shard(self, shard_id: str) -> None:
        self._shards.pop(shard_id, None)
        self.lru.drop_shard(shard_id)

    # -- put -------------------------------------------------------------------------------------

    def put(
        self,
        ids_T: object,
        logprobs_T: object,
        topk_ids_TK: object | None,
        topk_logprobs_TK: object | None,
        from_pos: int,
    ) -> PutResult:
        """Store the blocks the caller newly computed (positions >= from_pos) that are not cached yet.

        Arrays are aligned to positions 0..T-1 (value t scores token t given tokens < t); values
        before `from_pos` are ignored and position 0 is stored as NaN / id 0. A block is stored only
        if it is complete (starts at or after from_pos, or is block 0 with from_pos <= 1) and every
        block before it is cached or stored in the same call: a block behind a gap is unreachable.
        """
        return self.put_many([(ids_T, logprobs_T, topk_ids_TK, topk_logprobs_TK, from_pos)])[0]

    def put_many(self, items: Sequence[tuple[object, object, object | None, object | None, int]]) -> list[PutResult]:
        """`put` for a batch: one index round trip, one write per array per shard, one Redis update."""
        if self.writer_id is None:
            raise CacheError("this TeacherCache is read-only: pass writer_id to put")
        if self._closed:
            raise CacheError("this TeacherCache is closed")
        prepared = [self._prepare(n, *item) for n, item in enumerate(items)]
        all_blocks = [self.keys(p[0]) for p in prepared]
        flat = [b.key_hex for blocks in all_blocks for b in blocks]
        raws = self.redis.hmget(self.names.index, flat) if flat else []
        present = {key for key, raw in zip(flat, raws, strict=True) if raw is not None}
        chosen: list[_Pending] = []
        counts = [[0, 0, 0, 0, 0] for _ in items]  # written, tokens, bytes, cached, skipped
        in_batch: set[str] = set()
        for n, blocks in enumerate(all_blocks):
            from_pos = prepared[n][4]
            reachable = True
            for bk in blocks:
                if bk.key_hex in present or bk.key_hex in in_batch:
                    counts[n][3] += 1
                    continue
                complete = bk.start >= from_pos or (bk.start == 0 and from_pos <= 1)
                if not (complete and reachable):
                    counts[n][4] += 1
                    reachable = False
                    continue
                chosen.append(_Pending(n, bk))
                in_batch.add(bk.key_hex)
                counts[n][0] += 1
                counts[n][1] += bk.length
                counts[n][2] += bk.length * self._row_bytes + RECORD_BYTES
        if chosen:
            self._write(chosen, prepared)
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(self.names.counters, "puts", len(items))
            pipe.hincrby(self.names.counters, "blocks_written", len(chosen))
            pipe.hincrby(self.names.counters, "tokens_written", sum(c[1] for c in counts))
            pipe.hincrby(self.names.counters, "bytes_written", sum(c[2] for c in counts))
            pipe.execute()
        return [PutResult(*c) for c in counts]

    @property
    def _row_bytes(self) -> int:
        return 4 + self.k * (4 + self.topk_dtype.itemsize)

    def _prepare(
        self, n: int, ids_T: object, logprobs_T: object, topk_ids_TK: object | None, topk_logprobs_TK: object | None, from_pos: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """Validate one put item and convert it to the stored dtypes (position 0 blanked)."""
        where = f"put item {n}"
        ids = as_token_ids(ids_T, f"{where}: ids_T")
        t = int(ids.shape[0])
        if isinstance(from_pos, bool) or not isinstance(from_pos, int | np.integer) or not 0 <= from_pos <= t:
            raise ValueError(f"{where}: from_pos must be an int in [0, {t}], got {from_pos!r}")
        lp_in = np.asarray(logprobs_T)
        if lp_in.shape != (t,) or not np.issubdtype(lp_in.dtype, np.floating):
            raise ValueError(f"{where}: logprobs_T must be float[{t}], got {lp_in.dtype}{list(lp_in.shape)}")
        if self.k == 0 and topk_ids_TK is None and topk_logprobs_TK is None:
            ids_in = np.zeros((t, 0), np.int32)
            tlp_in = np.zeros((t, 0), self.topk_dtype)
        else:
            ids_in, tlp_in = np.asarray(topk_ids_TK), np.asarray(topk_logprobs_TK)
        if ids_in.shape != (t, self.k) or (ids_in.size and not np.issubdtype(ids_in.dtype, np.integer)):
            raise ValueError(f"{where}: topk_ids_TK must be int[{t}, {self.k}], got {ids_in.dtype}{list(ids_in.shape)}")
        if tlp_in.shape != (t, self.k) or (tlp_in.size and not np.issubdtype(tlp_in.dtype, np.floating)):
            raise ValueError(
                f"{where}: topk_logprobs_TK must be float[{t}, {self.k}], got {tlp_in.dtype}{list(tlp_in.shape)}"
            )
        first = max(1, int(from_pos))
        if t > first:
            if np.isnan(lp_in[first:]).any():
                bad = first + int(np.flatnonzero(np.isnan(lp_in[first:]))[0])
                raise ValueError(f"{where}: logprobs_T[{bad}] is NaN (only position 0 may lack a score)")
            if ids_in.size and (int(ids_in[first:].min()) < 0 or int(ids_in[first:].max()) > np.iinfo(np.int32).max):
                raise ValueError(f"{where}: topk_ids_TK holds ids outside [0, int32 max] at positions >= {first}")
            if tlp_in.size and np.isnan(tlp_in[first:]).any():
                raise ValueError(f"{where}: topk_logprobs_TK has NaN at positions >= {first}")
        lp = lp_in.astype("<f4", copy=True)
        ids_out = ids_in.astype("<i4", copy=True)
        tlp = tlp_in.astype(self.topk_dtype.newbyteorder("<"), copy=True)
        if t:
            lp[0] = np.nan
            ids_out[0] = 0
            tlp[0] = np.nan
        return ids, lp, ids_out, tlp, int(from_pos)

    def _write(
        self, chosen: list[_Pending], prepared: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]
    ) -> list[tuple[str, IndexEntry]]:
        """Append the chosen blocks to the active shard, rolling over when it is full.

        If a write fails (e.g. the shard's tail chunk is damaged, so zarr cannot merge into it) the
        shard is sealed at its last committed row and the batch is retried once in a fresh shard:
        a bad file must not stop the cache from taking new entries.
        """
        written: list[tuple[str, IndexEntry]] = []
        i = 0
        retried = False
        while i < len(chosen):
            if self._active is None:
                self._roll_over()
            assert self._active is not None
            batch: list[_Pending] = []
            rows = self._next_row
            for p in chosen[i:]:
                if rows + p.block.length > self.shard_rows or self._next_record + len(batch) + 1 > self.shard_rows:
                    break
                batch.append(p)
                rows += p.block.length
            if not batch:
                self._roll_over()
                continue
            try:
                entries = self._flush(self._active, batch, prepared)
            except Exception as exc:
                if retried:
                    raise
                log.warning("teacher cache: write to shard %s failed (%s: %s); sealing it and retrying in a new shard",
                            self._active.shard_id, type(exc).__name__, exc)
                retried = True
                self._roll_over()
                continue
            # Indexed before the shard can be sealed (next roll-over), so only the active shard can
            # hold records without index fields: the one shard a restarted writer re-indexes.
            self.redis.hset(self.names.index, mapping={key: e.pack() for key, e in entries})
            written += entries
            retried = False
            i += len(batch)
        return written

    def _flush(
        self, shard: Shard, batch: list[_Pending], prepared: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]
    ) -> list[tuple[str, IndexEntry]]:
        """Write one shard's part of a put: data rows first, their records second (both durable).

        The writer's row/record cursors move only after both writes succeed, so a failure leaves
        the rows unreferenced and the next write simply overwrites them.
        """
        entries: list[tuple[str, IndexEntry]] = []
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        row = self._next_row
        for p in batch:
            bk = p.block
            _, lp, ids, tlp, _ = prepared[p.item]
            part = (lp[bk.start : bk.end], ids[bk.start : bk.end], tlp[bk.start : bk.end])
            entries.append((bk.key_hex, IndexEntry(shard.shard_id, row, bk.length, entry_checksum(*part))))
            parts.append(part)
            row += bk.length
        self.lru.drop_rows(shard, self._next_row, row)
        data = [np.concatenate([part[j] for part in parts]) for j in range(3)]
        touched = shard.write_rows(self._next_row, data[0], data[1], data[2])
        if self.fsync:
            self.root.fsync_keys(touched)
        records = pack_records([(key, e.row, e.length, e.checksum) for key, e in entries])
        touched = shard.write_records(self._next_record, records)
        if self.fsync:
            self.root.fsync_keys(touched)
        self._next_row = row
        self._next_record += len(entries)
        return entries

    def _roll_over(self) -> None:
        """Seal the active shard (if any) and start a new one."""
        if self._active is not None:
            self._active.seal(self._next_row, self._next_record)
        assert self.writer_id is not None
        shard = Shard.create(
            self.root, self.writer_id, k=self.k, topk_dtype=self.topk_dtype.name, capacity=self.shard_rows,
            chunk_bytes=self.chunk_bytes, compression=self.compression,
        )
        self.redis.zadd(self.names.shard_hits, {shard.shard_id: shard.created_at}, nx=True)
        self._shards[shard.shard_id] = shard
        self._active, self._next_row, self._next_record = shard, 0, 0

    # -- recovery --------------------------------------------------------------------------------

    def _recover(self) -> RecoveryReport:
        """Adopt what a previous process with this writer_id left behind (we hold its lock)."""
        assert self.writer_id is not None
        sealed: list[str] = []
        removed: list[str] = []
        reindexed = 0
        resumable: list[tuple[Shard, RecordScan]] = []
        shard_ids = self.root.list_shards(self.writer_id)
        for sid in shard_ids:
            try:
                shard = Shard.open(self.root, sid)
            except ShardUnavailable as exc:
                log.warning("teacher cache: removing incomplete shard %s (%s)", sid, exc)
                self.root.delete_shard(sid)
                removed.append(sid)
                continue
            if shard.sealed:
                continue
            scan = shard.read_records()
            reindexed += self._reindex(shard, scan)
            resumable.append((shard, scan))
        resumed: str | None = None
        for n, (shard, scan) in enumerate(resumable):
            last = n == len(resumable) - 1
            fits = (shard.k == self.k and shard.topk_dtype == self.topk_dtype and shard.capacity == self.shard_rows
                    and not scan.unreadable and scan.torn == 0)
            if last and fits and scan.used_rows + self.block_size <= shard.capacity:
                self._active, self._next_row, self._next_record = shard, scan.used_rows, scan.next_index
                self._shards[shard.shard_id] = shard
                resumed = shard.shard_id
            else:
                shard.seal(scan.used_rows, scan.next_index)
                sealed.append(shard.shard_id)
        return RecoveryReport(len(shard_ids), resumed, self._next_row if resumed else 0, reindexed, sealed, removed)

    def _reindex(self, shard: Shard, scan: RecordScan) -> int:
        """Index records whose index field never got written (the writer died after the record)."""
        if not scan.records:
            return 0
        keys = [r.key_hex for r in scan.records]
        raws = self.redis.hmget(self.names.index, keys)
        todo = [r for r, raw in zip(scan.records, raws, strict=True) if raw is None]
        mapping: dict[str, bytes] = {}
        for r in todo:
            try:
                data = shard.read_rows(r.row, r.end)
            except Exception as exc:
                log.warning("teacher cache: not re-indexing %s in %s: %s", r.key_hex, shard.shard_id, exc)
                continue
            if entry_checksum(*data) == r.checksum:
                mapping[r.key_hex] = IndexEntry(shard.shard_id, r.row, r.length, r.checksum).pack()
        if mapping:
            pipe = self.redis.pipeline(transaction=False)
            for key, value in mapping.items():
                pipe.hsetnx(self.names.index, key, value)
            pipe.execute()
        return len(mapping)
