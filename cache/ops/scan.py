"""What every cache operation shares: scanning one shard's records (and checking its entries' data),
reading the whole index, opening a cache root by path or URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis as redis_lib

from cache.index import RedisNames, connect_redis
from cache.layout import (
    LOGPROBS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    ShardIncomplete,
    ShardRecord,
    ShardUnavailable,
    entry_checksum,
)
from cache.root import CacheRoot
from cache.shards import RecordScan, Shard


@dataclass(frozen=True)
class BadEntry:
    """An entry whose data cannot be served: which block key, where, and why."""

    key_hex: str
    shard: str
    row: int
    length: int
    reason: str
    indexed: bool = False


@dataclass
class ShardScan:
    """One shard as an operation sees it: its records, the good and the bad entries, or why it cannot be opened."""

    shard_id: str
    shard: Shard | None
    records: RecordScan
    good: list[ShardRecord]
    bad: list[BadEntry]
    error: str | None = None
    incomplete: bool = False


def scan_shard(root: CacheRoot, shard_id: str, *, check_data: bool) -> ShardScan:
    """Read a shard's records and (optionally) check every entry's data against its checksum.

    Data is read one chunk at a time so that one damaged chunk condemns only the entries in it,
    and the damaged chunk is named in the reason.
    """
    try:
        shard = Shard.open(root, shard_id)
    except ShardUnavailable as exc:
        return ShardScan(shard_id, None, RecordScan([], 0, []), [], [], str(exc), isinstance(exc, ShardIncomplete))
    scan = shard.read_records()
    if not check_data or not scan.records:
        return ShardScan(shard_id, shard, scan, list(scan.records), [])
    used = scan.used_rows
    data: dict[str, np.ndarray] = {}
    broken: dict[str, list[tuple[int, int, str]]] = {}
    for name in shard.data_names:
        c = shard.chunk_rows[name]
        parts: list[np.ndarray] = []
        for i in range(0, (used + c - 1) // c):
            lo, hi = i * c, min((i + 1) * c, used)
            try:
                parts.append(np.asarray(shard.arrays[name][lo:hi]))
            except Exception as exc:  # a damaged chunk: remember which rows it takes down
                broken.setdefault(name, []).append((lo, hi, f"{shard.chunk_key(name, i)}: {type(exc).__name__}: {exc}"))
                arr = shard.arrays[name]
                parts.append(np.zeros((hi - lo, *arr.shape[1:]), arr.dtype))
        data[name] = np.concatenate(parts) if parts else np.zeros((0,))
    good: list[ShardRecord] = []
    bad: list[BadEntry] = []
    empty = np.zeros((0, 0))
    for r in scan.records:
        if r.end > shard.capacity or r.length < 1:
            bad.append(BadEntry(r.key_hex, shard_id, r.row, r.length, f"record rows [{r.row}, {r.end}) out of range"))
            continue
        hit = [why for name in shard.data_names for lo, hi, why in broken.get(name, []) if lo < r.end and r.row < hi]
        if hit:
            bad.append(BadEntry(r.key_hex, shard_id, r.row, r.length, "unreadable chunk " + "; ".join(hit)))
            continue
        lp = data[LOGPROBS][r.row : r.end]
        ids = data[TOPK_IDS][r.row : r.end] if shard.k else empty
        tlp = data[TOPK_LOGPROBS][r.row : r.end] if shard.k else empty
        if entry_checksum(lp, ids, tlp) != r.checksum:
            keys = sorted({k for name in shard.data_names for k in shard.chunk_keys(name, r.row, r.end)})
            bad.append(BadEntry(r.key_hex, shard_id, r.row, r.length, f"checksum mismatch (chunks {', '.join(keys)})"))
            continue
        good.append(r)
    return ShardScan(shard_id, shard, scan, good, bad)


def read_index(client: redis_lib.Redis, names: RedisNames) -> dict[str, bytes]:
    """The whole index: block key -> packed `IndexEntry`."""
    return {k.decode(): v for k, v in client.hscan_iter(names.index, count=5000)}


def open_parts(root: str | os.PathLike[str], redis: redis_lib.Redis | str, redis_prefix: str,
          storage_options: dict[str, Any] | None) -> tuple[CacheRoot, redis_lib.Redis, RedisNames]:
    """An existing cache root (never created here), a Redis client and the index names."""
    return CacheRoot(root, create=False, storage_options=storage_options), connect_redis(redis), RedisNames(redis_prefix)
