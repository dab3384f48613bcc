"""The teacher's content-addressed logprob cache: Zarr shards on disk, a Redis index for speed.

The two halves live in their own modules: the on-disk half in `cache.layout` (names, fixed-width
manifest records, checksums), `cache.root` (one writer per shard, writer locks) and `cache.shards`
(one shard's arrays, the decoded-chunk LRU), and `cache.index` (the Redis index, which is only an
index: the shards are the source of truth). `TeacherCache` here ties them together; its read path is
`cache.reader`, its write path (and a writer's recovery at start) `cache.writer`.

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

import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np
import redis as redis_lib

from cache.index import DEFAULT_REDIS_PREFIX, RedisNames, connect_redis
from cache.keys import BlockKey, CacheSpec, cache_namespace
from cache.layout import TOPK_DTYPES, CacheError, compressors, validate_writer_id
from cache.reader import CacheHit, CacheReader
from cache.root import CacheRoot, WriterLock
from cache.shards import ChunkLRU, Shard
from cache.writer import CacheWriter, PutResult, RecoveryReport


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
        dtype_name = _topk_dtype_name(topk_dtype)
        _check_sizes(block_size=block_size, shard_rows=shard_rows, chunk_bytes=chunk_bytes,
                     read_cache_bytes=read_cache_bytes)
        compressors(compression)
        self.spec = CacheSpec(_namespace(teacher_identity, namespace, k, dtype_name), block_size, int(k),
                              np.dtype(dtype_name))
        self.namespace, self.k, self.topk_dtype, self.block_size = (
            self.spec.namespace, self.spec.k, self.spec.topk_dtype, block_size)
        self.names = RedisNames(redis_prefix)
        self.redis = connect_redis(redis)
        self.root = CacheRoot(root, create=True, storage_options=storage_options)
        self.lru = ChunkLRU(read_cache_bytes)
        self.writer_id = None if writer_id is None else validate_writer_id(writer_id)
        shards: dict[str, Shard] = {}  # open handles, shared by the reader and the writer
        self.reader = CacheReader(self.spec, self.root, self.redis, self.names, self.lru, shards)
        self.writer: CacheWriter | None = None
        self._lock: WriterLock | None = None
        self._closed = False
        self.recovery = RecoveryReport()
        if self.writer_id is not None:
            self.writer = CacheWriter(self.spec, self.root, self.redis, self.names, self.lru, shards, self.writer_id,
                                      shard_rows=shard_rows, chunk_bytes=chunk_bytes, compression=compression,
                                      fsync=fsync)
            self._lock = self.root.acquire_writer_lock(self.writer_id, lock_timeout_s)
            try:
                self.recovery = self.writer.recover()
            except BaseException:
                self.close()
                raise

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the writer lock. The active shard stays unsealed so a restart resumes it."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.writer is not None:
            self.writer.active = None
        self._closed = True

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def active_shard(self) -> str | None:
        active = None if self.writer is None else self.writer.active
        return None if active is None else active.shard_id

    def keys(self, ids_T: object) -> list[BlockKey]:
        return self.spec.keys(ids_T)

    # -- lookup (cache.reader) -------------------------------------------------------------------

    def missing_start(self, ids_T: object) -> int:
        """First position not covered by indexed blocks (index only: no data read, no counters).

        Optimistic: a later `lookup` may still stop earlier if a block fails its checksum.
        """
        return self.reader.missing_start(ids_T)

    def lookup(self, ids_T: object) -> CacheHit:
        """The longest fully cached, checksum-verified prefix of `ids_T` (see `CacheHit`)."""
        return self.reader.lookup_many([ids_T])[0]

    def lookup_many(self, sequences: Sequence[object]) -> list[CacheHit]:
        """`lookup` for a batch: one index round trip for all sequences, one counter update."""
        return self.reader.lookup_many(sequences)

    # -- put (cache.writer) ----------------------------------------------------------------------

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
        if self.writer is None:
            raise CacheError("this TeacherCache is read-only: pass writer_id to put")
        if self._closed:
            raise CacheError("this TeacherCache is closed")
        return self.writer.put_many(items)


def _topk_dtype_name(topk_dtype: str | np.dtype) -> str:
    """The name of a supported top-k storage dtype (`TOPK_DTYPES`), or a ValueError naming the choices."""
    try:
        dtype_name = np.dtype(topk_dtype).name
    except TypeError as exc:
        raise ValueError(f"topk_dtype must be one of {TOPK_DTYPES}, got {topk_dtype!r}") from exc
    if dtype_name not in TOPK_DTYPES:
        raise ValueError(f"topk_dtype must be one of {TOPK_DTYPES}, got {topk_dtype!r}")
    return dtype_name


def _check_sizes(*, block_size: int, shard_rows: int, chunk_bytes: int, read_cache_bytes: int) -> None:
    for name, value, low in (("block_size", block_size, 1), ("shard_rows", shard_rows, 1),
                             ("chunk_bytes", chunk_bytes, 1), ("read_cache_bytes", read_cache_bytes, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if shard_rows < block_size:
        raise ValueError(f"shard_rows ({shard_rows}) must be >= block_size ({block_size}): a block never spans shards")


def _namespace(teacher_identity: str | None, namespace: str | None, k: int, dtype_name: str) -> str:
    """The cache's key namespace: derived from the teacher identity, or given (then it must carry k and the dtype)."""
    if (teacher_identity is None) == (namespace is None):
        raise ValueError("pass exactly one of teacher_identity or namespace (from cache.keys.cache_namespace)")
    if namespace is None:
        return cache_namespace(str(teacher_identity), k, dtype_name)
    suffix = cache_namespace("x", k, dtype_name)[1:]
    if not isinstance(namespace, str) or not namespace.endswith(suffix) or len(namespace) == len(suffix):
        raise ValueError(
            f"namespace {namespace!r} must come from cache_namespace(identity, k={k}, topk_dtype={dtype_name}): "
            f"entries of a different k or top-k dtype must never be shared"
        )
    return namespace
