"""`opd cache evict`: remove least-recently-hit removable shards until the cache fits its budget.

Why whole shards: a writer appends to one *active* shard and, after `shard_rows` rows, seals it and
starts the next (see `cache.shards`). Sealed shards are immutable, so deleting one never races a
writer. Each lookup records, per shard it served from, the time of that hit in a Redis sorted set
(`<prefix>:shard_hits`; a new shard starts at its creation time). `evict` sums the shards' bytes on
disk and, while the total is over budget, removes the least-recently-hit removable shard: first its
index fields (compare-and-delete, so a block re-stored elsewhere keeps its entry), then its files.
Removable means sealed, or (local roots only) belonging to a writer whose flock is free, i.e. whose
process is gone; `evict` holds that lock while deleting so the writer cannot restart into a
half-deleted shard. A live writer's active shard is never removed, so the budget can be exceeded by at
most one active shard per live writer; the report says so.

A reader that looked up an index field just before eviction reads missing chunks, fails the checksum
and sees a miss (the shard is gone, so it is not counted as corruption).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis as redis_lib

from cache.index import DEFAULT_REDIS_PREFIX, IndexEntry, RedisNames, delete_index_if_equal
from cache.layout import CacheError, ShardUnavailable
from cache.ops.scan import open_parts
from cache.root import CacheRoot, WriterLock
from cache.shards import Shard


@dataclass(frozen=True)
class EvictedShard:
    shard: str
    nbytes: int
    last_hit: float
    index_fields_removed: int


@dataclass
class EvictReport:
    """Before/after sizes, the shards removed (least recently hit first), and what could not go."""

    budget_bytes: int
    bytes_before: int
    bytes_after: int
    removed: list[EvictedShard] = field(default_factory=list)
    active_kept: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def over_budget(self) -> bool:
        return self.bytes_after > self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"over_budget": self.over_budget}


def evict(root: str | os.PathLike[str], redis: redis_lib.Redis | str, budget_bytes: int, *,
          redis_prefix: str = DEFAULT_REDIS_PREFIX, dry_run: bool = False,
          storage_options: dict[str, Any] | None = None) -> EvictReport:
    """Remove least-recently-hit removable shards until the store fits `budget_bytes` (see module docs)."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
    croot, client, names = open_parts(root, redis, redis_prefix, storage_options)
    shard_ids = croot.list_shards()
    sizes = {sid: croot.shard_nbytes(sid) for sid in shard_ids}
    total = sum(sizes.values())
    report = EvictReport(budget_bytes, total, total, dry_run=dry_run)
    if total <= budget_bytes:
        return report
    scores = dict(zip(shard_ids, client.zmscore(names.shard_hits, shard_ids), strict=True)) if shard_ids else {}
    locks: dict[str, WriterLock | None] = {}
    try:
        candidates: list[tuple[float, str, Shard | None]] = []
        for sid in shard_ids:
            try:
                shard: Shard | None = Shard.open(croot, sid)
            except ShardUnavailable:
                shard = None  # half-created or damaged metadata: removable if its writer is gone
            writer = sid.split("/")[0]
            if shard is None or not shard.sealed:
                if writer not in locks:
                    locks[writer] = _try_lock(croot, writer)
                if locks[writer] is None:
                    report.active_kept.append(sid)
                    continue
            score = scores.get(sid)
            last = float(score) if score is not None else (shard.created_at if shard is not None else 0.0)
            candidates.append((last, sid, shard))
        candidates.sort(key=lambda c: (c[0], c[1]))
        for last, sid, shard in candidates:
            if total <= budget_bytes:
                break
            removed_fields = 0
            if not dry_run:
                removed_fields = _unindex_shard(croot, client, names, sid, shard)
                croot.delete_shard(sid)
                client.zrem(names.shard_hits, sid)
            total -= sizes[sid]
            report.removed.append(EvictedShard(sid, sizes[sid], last, removed_fields))
    finally:
        for lock in locks.values():
            if lock is not None:
                lock.release()
    report.bytes_after = total
    if not dry_run:
        client.hincrby(names.counters, "evicted_shards", len(report.removed))
        client.hset(names.counters, "last_evict_at", int(time.time()))
    return report


def _try_lock(croot: CacheRoot, writer_id: str) -> WriterLock | None:
    """The writer's lock if its process is gone; None if it is alive or the root cannot lock."""
    try:
        return croot.acquire_writer_lock(writer_id, timeout_s=0.0)
    except CacheError:
        return None


def _unindex_shard(croot: CacheRoot, client: redis_lib.Redis, names: RedisNames, shard_id: str, shard: Shard | None) -> int:
    """Remove the index fields that point into a shard about to be deleted (compare-and-delete).

    The shard's records name its fields; if they cannot be trusted (unreadable or torn), the index
    is scanned for fields naming the shard instead.
    """
    scan = shard.read_records() if shard is not None else None
    if scan is not None and not scan.unreadable and not scan.torn:
        pairs = [(r.key_hex, IndexEntry(shard_id, r.row, r.length, r.checksum).pack()) for r in scan.records]
    else:
        pairs = []
        for key, raw in client.hscan_iter(names.index, count=5000):
            with contextlib.suppress(ValueError):
                if IndexEntry.unpack(raw).shard == shard_id:
                    pairs.append((key.decode(), raw))
    return delete_index_if_equal(client, names, pairs)
