"""Operating the teacher cache: stats, verify, rebuild_index, evict.

These take the cache root and Redis rather than a `TeacherCache`, so an operator can run them from
any process (`opd cache ...`) while teachers keep reading and writing.

Eviction, and why it works on whole shards: a writer appends to one *active* shard and, after
`shard_rows` rows, seals it and starts the next (see `cache.shards`). Sealed shards are immutable, so
deleting one never races a writer. Each lookup records, per shard it served from, the time of that
hit in a Redis sorted set (`<prefix>:shard_hits`; a new shard starts at its creation time). `evict`
sums the shards' bytes on disk and, while the total is over budget, removes the least-recently-hit
removable shard: first its index fields (compare-and-delete, so a block re-stored elsewhere keeps
its entry), then its files. Removable means sealed, or (local roots only) belonging to a writer
whose flock is free, i.e. whose process is gone; `evict` holds that lock while deleting so the
writer cannot restart into a half-deleted shard. A live writer's active shard is never removed, so
the budget can be exceeded by at most one active shard per live writer; the report says so.

A reader that looked up an index field just before eviction reads missing chunks, fails the
checksum and sees a miss (the shard is gone, so it is not counted as corruption).

`verify` reads the index *before* scanning shards: an entry a writer adds meanwhile has its record
written before its index field, so it cannot show up as dangling.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import numpy as np
import redis as redis_lib

from cache.index import DEFAULT_REDIS_PREFIX, IndexEntry, RedisNames, connect_redis, delete_index_if_equal
from cache.layout import (
    LOGPROBS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    CacheError,
    ShardIncomplete,
    ShardRecord,
    ShardUnavailable,
    entry_checksum,
)
from cache.root import CacheRoot, WriterLock
from cache.shards import RecordScan, Shard

COUNTERS = ("lookups", "hit_tokens", "miss_tokens", "corrupt_blocks", "puts", "blocks_written",
            "tokens_written", "bytes_written")


# ---------------------------------------------------------------------------------------------
# shared scanning
# ---------------------------------------------------------------------------------------------


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
class _ShardScan:
    shard_id: str
    shard: Shard | None
    records: RecordScan
    good: list[ShardRecord]
    bad: list[BadEntry]
    error: str | None = None
    incomplete: bool = False


def _scan_shard(root: CacheRoot, shard_id: str, *, check_data: bool) -> _ShardScan:
    """Read a shard's records and (optionally) check every entry's data against its checksum.

    Data is read one chunk at a time so that one damaged chunk condemns only the entries in it,
    and the damaged chunk is named in the reason.
    """
    try:
        shard = Shard.open(root, shard_id)
    except ShardUnavailable as exc:
        return _ShardScan(shard_id, None, RecordScan([], 0, []), [], [], str(exc), isinstance(exc, ShardIncomplete))
    scan = shard.read_records()
    if not check_data or not scan.records:
        return _ShardScan(shard_id, shard, scan, list(scan.records), [])
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
    return _ShardScan(shard_id, shard, scan, good, bad)


def _read_index(client: redis_lib.Redis, names: RedisNames) -> dict[str, bytes]:
    return {k.decode(): v for k, v in client.hscan_iter(names.index, count=5000)}


def _open(root: str | os.PathLike[str], redis: redis_lib.Redis | str, redis_prefix: str,
          storage_options: dict[str, Any] | None) -> tuple[CacheRoot, redis_lib.Redis, RedisNames]:
    return CacheRoot(root, create=False, storage_options=storage_options), connect_redis(redis), RedisNames(redis_prefix)


# ---------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheStats:
    """Size and traffic of one cache. bytes_per_token = bytes on disk / rows stored in shards."""

    shards: int
    sealed_shards: int
    entries: int
    indexed_tokens: int
    stored_entries: int
    stored_tokens: int
    bytes_on_disk: int
    bytes_per_token: float
    counters: dict[str, int]
    hit_rate: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stats(root: str | os.PathLike[str], redis: redis_lib.Redis | str, *, redis_prefix: str = DEFAULT_REDIS_PREFIX,
          storage_options: dict[str, Any] | None = None) -> CacheStats:
    """Entries and tokens (index and shards), bytes on disk and per token, hit/miss counters."""
    croot, client, names = _open(root, redis, redis_prefix, storage_options)
    entries = 0
    indexed_tokens = 0
    for _key, raw in client.hscan_iter(names.index, count=5000):
        entries += 1
        with contextlib.suppress(ValueError):
            indexed_tokens += IndexEntry.unpack(raw).length
    shard_ids = croot.list_shards()
    sealed = stored_entries = stored_tokens = disk = 0
    for sid in shard_ids:
        disk += croot.shard_nbytes(sid)
        try:
            shard = Shard.open(croot, sid)
        except ShardUnavailable:
            continue
        sealed += shard.sealed
        if shard.sealed and isinstance(shard.attrs.get("records"), int) and isinstance(shard.attrs.get("rows"), int):
            # A writer appends without gaps (resuming overwrites rows no record points to), so a
            # sealed shard's rows are its stored tokens; no need to read its records.
            stored_entries += int(shard.attrs["records"])
            stored_tokens += int(shard.attrs["rows"])
            continue
        recs = shard.read_records().records
        stored_entries += len(recs)
        stored_tokens += sum(r.length for r in recs)
    raw_counters = client.hgetall(names.counters)
    counters = dict.fromkeys(COUNTERS, 0) | {k.decode(): int(v) for k, v in raw_counters.items()}
    looked = counters["hit_tokens"] + counters["miss_tokens"]
    return CacheStats(
        shards=len(shard_ids), sealed_shards=sealed, entries=entries, indexed_tokens=indexed_tokens,
        stored_entries=stored_entries, stored_tokens=stored_tokens, bytes_on_disk=disk,
        bytes_per_token=disk / stored_tokens if stored_tokens else 0.0, counters=counters,
        hit_rate=counters["hit_tokens"] / looked if looked else 0.0,
    )


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexProblem:
    """An index field that does not point at a good record: key, what it says, and why it is wrong."""

    key_hex: str
    shard: str
    reason: str


@dataclass
class VerifyReport:
    """ok: no bad data, no dangling index field, every shard and record chunk readable.

    Not problems: unindexed good records (a writer died between record and index field, or a block
    was stored twice; `rebuild_index` or the writer's restart indexes them) and incomplete shards (a
    writer died creating one; it holds nothing, and the writer's restart or `evict` removes it).
    """

    shards: int = 0
    entries: int = 0
    index_entries: int = 0
    bad: list[BadEntry] = field(default_factory=list)
    dangling: list[IndexProblem] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    torn_records: int = 0
    unindexed: list[str] = field(default_factory=list)
    incomplete_shards: list[str] = field(default_factory=list)
    repaired: int = 0

    @property
    def ok(self) -> bool:
        return not (self.bad or self.dangling or self.unreadable)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}

    def summary(self) -> str:
        lines = [f"verify: {'OK' if self.ok else 'PROBLEMS'}: {self.shards} shards, {self.entries} stored entries, "
                 f"{self.index_entries} indexed, {len(self.unindexed)} unindexed, {self.torn_records} torn record slots"]
        lines += [f"  bad entry {b.key_hex} in {b.shard} rows [{b.row}, {b.row + b.length}): {b.reason}" for b in self.bad]
        lines += [f"  dangling index field {d.key_hex} -> {d.shard}: {d.reason}" for d in self.dangling]
        lines += [f"  unreadable: {u}" for u in self.unreadable]
        return "\n".join(lines)


def verify(root: str | os.PathLike[str], redis: redis_lib.Redis | str, *, redis_prefix: str = DEFAULT_REDIS_PREFIX,
           check_data: bool = True, repair: bool = False, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Check the index against the shards and every stored entry against its checksum.

    repair=True removes index fields that point at bad or missing data (compare-and-delete) and
    indexes good records that have no field; it never touches shard files.
    """
    croot, client, names = _open(root, redis, redis_prefix, storage_options)
    index = _read_index(client, names)  # before the shard scan: see module docs
    report = VerifyReport(index_entries=len(index))
    scans = [_scan_shard(croot, sid, check_data=check_data) for sid in croot.list_shards()]
    report.shards = len(scans)
    good: dict[tuple[str, str], ShardRecord] = {}
    bad_at: dict[tuple[str, str, int], BadEntry] = {}
    for s in scans:
        if s.incomplete:
            report.incomplete_shards.append(s.shard_id)
        elif s.error:
            report.unreadable.append(s.error)
        report.unreadable += [f"shard {s.shard_id}: record chunk {u}" for u in s.records.unreadable]
        report.torn_records += s.records.torn
        report.entries += len(s.records.records)
        for r in s.good:
            good[(r.key_hex, s.shard_id)] = r
        for b in s.bad:
            bad_at[(b.key_hex, b.shard, b.row)] = b
    to_delete: list[tuple[str, bytes]] = []
    for key_hex, raw in index.items():
        try:
            e = IndexEntry.unpack(raw)
        except ValueError as exc:
            report.dangling.append(IndexProblem(key_hex, "?", str(exc)))
            to_delete.append((key_hex, raw))
            continue
        b = bad_at.get((key_hex, e.shard, e.row))
        if b is not None:
            bad_at[(key_hex, e.shard, e.row)] = BadEntry(b.key_hex, b.shard, b.row, b.length, b.reason, indexed=True)
            to_delete.append((key_hex, raw))
            continue
        r = good.get((key_hex, e.shard))
        if r is None or (r.row, r.length, r.checksum) != (e.row, e.length, e.checksum):
            why = "no matching record in shard" if croot.shard_exists(e.shard) else "shard does not exist"
            report.dangling.append(IndexProblem(key_hex, e.shard, why))
            to_delete.append((key_hex, raw))
    report.bad = list(bad_at.values())
    missing = {key: (sid, r) for (key, sid), r in good.items() if key not in index}
    report.unindexed = sorted(missing)
    if repair:
        report.repaired = delete_index_if_equal(client, names, to_delete)
        if missing:
            pipe = client.pipeline(transaction=False)
            for key_hex, (sid, r) in missing.items():
                pipe.hsetnx(names.index, key_hex, IndexEntry(sid, r.row, r.length, r.checksum).pack())
            report.repaired += sum(bool(x) for x in pipe.execute())
    return report


# ---------------------------------------------------------------------------------------------
# rebuild_index
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RebuildReport:
    """How the index changed: fields added, replaced (pointed at bad/missing data), removed."""

    shards: int
    records: int
    added: int
    replaced: int
    removed: int
    kept: int
    bad_skipped: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rebuild_index(root: str | os.PathLike[str], redis: redis_lib.Redis | str, *, redis_prefix: str = DEFAULT_REDIS_PREFIX,
                  check_data: bool = True, storage_options: dict[str, Any] | None = None) -> RebuildReport:
    """Make the index agree with the shards, the source of truth, without stopping writers.

    Every good record gets a field (HSET if missing, or if the field points at something that is not
    a good record); fields with no good record behind them are removed (compare-and-delete). With
    check_data the data of every record is checked first, so corrupt entries are never indexed.
    """
    croot, client, names = _open(root, redis, redis_prefix, storage_options)
    index = _read_index(client, names)
    scans = [_scan_shard(croot, sid, check_data=check_data) for sid in croot.list_shards()]
    valid: dict[str, dict[bytes, None]] = {}
    for s in scans:
        for r in s.good:
            valid.setdefault(r.key_hex, {})[IndexEntry(s.shard_id, r.row, r.length, r.checksum).pack()] = None
    added = replaced = kept = 0
    pipe = client.pipeline(transaction=False)
    for key_hex, values in valid.items():
        current = index.get(key_hex)
        if current in values:
            kept += 1
            continue
        pipe.hset(names.index, key_hex, next(iter(values)))
        if current is None:
            added += 1
        else:
            replaced += 1
    pipe.execute()
    removed = delete_index_if_equal(client, names, [(k, v) for k, v in index.items() if k not in valid])
    return RebuildReport(
        shards=len(scans), records=sum(len(s.records.records) for s in scans), added=added, replaced=replaced,
        removed=removed, kept=kept, bad_skipped=sum(len(s.bad) for s in scans),
    )


# ---------------------------------------------------------------------------------------------
# evict
# ---------------------------------------------------------------------------------------------


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
    croot, client, names = _open(root, redis, redis_prefix, storage_options)
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


def decode_corrupt_log(client: redis_lib.Redis, redis_prefix: str = DEFAULT_REDIS_PREFIX) -> dict[str, tuple[str, str, float]]:
    """Entries lookups found corrupt: key -> (shard, reason, unix time)."""
    names = RedisNames(redis_prefix)
    out: dict[str, tuple[str, str, float]] = {}
    for key, raw in client.hgetall(names.corrupt).items():
        shard, reason, at = msgpack.unpackb(raw)
        out[key.decode()] = (shard, reason, float(at))
    return out
