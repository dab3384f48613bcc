"""The teacher cache's write path: one process appends new blocks to its own active shard, and on start
adopts what its previous incarnation left behind.

Write order, and why a crash at any point is safe, in `cache.store`; the shard format in `cache.layout`
and `cache.shards`; the read path in `cache.reader`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import redis as redis_lib

from cache.index import IndexEntry, RedisNames
from cache.keys import BlockKey, CacheSpec, as_token_ids
from cache.layout import RECORD_BYTES, CacheError, ShardUnavailable, entry_checksum, pack_records
from cache.root import CacheRoot
from cache.shards import ChunkLRU, RecordScan, Shard
from protocol.files import DISK_FULL, write_error_reason

log = logging.getLogger(__name__)

DISK_FULL_REMIND_S = 300.0


class CacheDiskFull(CacheError):
    """A put not stored because the disk under the cache is full (ENOSPC / EDQUOT); raised from the OSError.

    Nothing was indexed for the blocks it did not store, and the shard stays usable: rows written before
    the failure have no record, so they are unreferenced and overwritten by the next put.
    """


class DiskFullLog:
    """One WARNING when the cache's disk fills, a reminder every `remind_s` while it stays full, one INFO
    when a put succeeds again: a teacher failing every batch must not log every batch."""

    def __init__(self, where: str, remind_s: float = DISK_FULL_REMIND_S) -> None:
        self.where = where
        self.remind_s = remind_s
        self.since: float | None = None
        self.failed_puts = 0
        self._last_line = 0.0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.failed_puts += 1
        if self.since is None:
            self.since, self._last_line = now, now
            log.warning("teacher cache: disk full under %s (%s: %s); scores are forwarded uncached (recomputed when "
                        "next needed) until space is back", self.where, type(exc).__name__, exc)
        elif now - self._last_line >= self.remind_s:
            self._last_line = now
            log.warning("teacher cache: disk under %s still full: %d puts not stored in %.0f s", self.where,
                        self.failed_puts, now - self.since)

    def ok(self) -> None:
        if self.since is not None:
            log.info("teacher cache: writing again under %s (%d puts not stored in %.0f s while the disk was full)",
                     self.where, self.failed_puts, time.monotonic() - self.since)
            self.since, self.failed_puts = None, 0


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


class CacheWriter:
    """Appends to the active shard of `writer_id` (whose lock the caller holds), rolling over when it is full.

    `shards` holds the open shard handles, shared with the cache's reader. `next_row` / `next_record` are
    the active shard's cursors: they move only after a write is durable.
    """

    def __init__(self, spec: CacheSpec, root: CacheRoot, redis: redis_lib.Redis, names: RedisNames, lru: ChunkLRU,
                 shards: dict[str, Shard], writer_id: str, *, shard_rows: int, chunk_bytes: int, compression: str,
                 fsync: bool) -> None:
        self.spec = spec
        self.root = root
        self.redis = redis
        self.names = names
        self.lru = lru
        self.shards = shards
        self.writer_id = writer_id
        self.shard_rows = shard_rows
        self.chunk_bytes = chunk_bytes
        self.compression = compression
        self.fsync = fsync
        self.active: Shard | None = None
        self.next_row = 0
        self.next_record = 0
        self.disk_full = DiskFullLog(root.url)

    def put_many(self, items: Sequence[tuple[object, object, object | None, object | None, int]]) -> list[PutResult]:
        """`put` for a batch: one index round trip, one write per array per shard, one Redis update."""
        prepared = [self._prepare(n, *item) for n, item in enumerate(items)]
        all_blocks = [self.spec.keys(p[0]) for p in prepared]
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
                counts[n][2] += bk.length * self.spec.row_bytes + RECORD_BYTES
        if chosen:
            try:
                self._write(chosen, prepared)
            except Exception as exc:
                if write_error_reason(exc) != DISK_FULL:
                    raise
                self.disk_full.failed(exc)
                raise CacheDiskFull(f"disk full under {self.root.url}: {exc}") from exc
            self.disk_full.ok()
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(self.names.counters, "puts", len(items))
            pipe.hincrby(self.names.counters, "blocks_written", len(chosen))
            pipe.hincrby(self.names.counters, "tokens_written", sum(c[1] for c in counts))
            pipe.hincrby(self.names.counters, "bytes_written", sum(c[2] for c in counts))
            pipe.execute()
        return [PutResult(*c) for c in counts]

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
        if self.spec.k == 0 and topk_ids_TK is None and topk_logprobs_TK is None:
            ids_in = np.zeros((t, 0), np.int32)
            tlp_in = np.zeros((t, 0), self.spec.topk_dtype)
        else:
            ids_in, tlp_in = np.asarray(topk_ids_TK), np.asarray(topk_logprobs_TK)
        if ids_in.shape != (t, self.spec.k) or (ids_in.size and not np.issubdtype(ids_in.dtype, np.integer)):
            raise ValueError(f"{where}: topk_ids_TK must be int[{t}, {self.spec.k}], got {ids_in.dtype}{list(ids_in.shape)}")
        if tlp_in.shape != (t, self.spec.k) or (tlp_in.size and not np.issubdtype(tlp_in.dtype, np.floating)):
            raise ValueError(
                f"{where}: topk_logprobs_TK must be float[{t}, {self.spec.k}], got {tlp_in.dtype}{list(tlp_in.shape)}"
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
        tlp = tlp_in.astype(self.spec.topk_dtype.newbyteorder("<"), copy=True)
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
        a bad file must not stop the cache from taking new entries. A full disk is not the shard's
        fault: it is raised at once (a new shard would not fit either), and the shard is kept.
        """
        written: list[tuple[str, IndexEntry]] = []
        i = 0
        retried = False
        while i < len(chosen):
            if self.active is None:
                self._roll_over()
            assert self.active is not None
            batch: list[_Pending] = []
            rows = self.next_row
            for p in chosen[i:]:
                if rows + p.block.length > self.shard_rows or self.next_record + len(batch) + 1 > self.shard_rows:
                    break
                batch.append(p)
                rows += p.block.length
            if not batch:
                self._roll_over()
                continue
            try:
                entries = self._flush(self.active, batch, prepared)
            except Exception as exc:
                if retried or write_error_reason(exc) == DISK_FULL:
                    raise
                log.warning("teacher cache: write to shard %s failed (%s: %s); sealing it and retrying in a new shard",
                            self.active.shard_id, type(exc).__name__, exc)
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
        row = self.next_row
        for p in batch:
            bk = p.block
            _, lp, ids, tlp, _ = prepared[p.item]
            part = (lp[bk.start : bk.end], ids[bk.start : bk.end], tlp[bk.start : bk.end])
            entries.append((bk.key_hex, IndexEntry(shard.shard_id, row, bk.length, entry_checksum(*part))))
            parts.append(part)
            row += bk.length
        self.lru.drop_rows(shard, self.next_row, row)
        data = [np.concatenate([part[j] for part in parts]) for j in range(3)]
        touched = shard.write_rows(self.next_row, data[0], data[1], data[2])
        if self.fsync:
            self.root.fsync_keys(touched)
        records = pack_records([(key, e.row, e.length, e.checksum) for key, e in entries])
        touched = shard.write_records(self.next_record, records)
        if self.fsync:
            self.root.fsync_keys(touched)
        self.next_row = row
        self.next_record += len(entries)
        return entries

    def _roll_over(self) -> None:
        """Seal the active shard (if any) and start a new one.

        The sealed shard stops being active before the new one is created: if creation fails (a full
        disk), the next put retries the creation instead of appending to a sealed shard.
        """
        if self.active is not None:
            self.active.seal(self.next_row, self.next_record)
            self.active = None
        shard = Shard.create(
            self.root, self.writer_id, k=self.spec.k, topk_dtype=self.spec.topk_dtype.name, capacity=self.shard_rows,
            chunk_bytes=self.chunk_bytes, compression=self.compression,
        )
        self.redis.zadd(self.names.shard_hits, {shard.shard_id: shard.created_at}, nx=True)
        self.shards[shard.shard_id] = shard
        self.active, self.next_row, self.next_record = shard, 0, 0

    # -- recovery (at start) --------------------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Adopt what a previous process with this writer_id left behind (we hold its lock)."""
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
            fits = (shard.k == self.spec.k and shard.topk_dtype == self.spec.topk_dtype and shard.capacity == self.shard_rows
                    and not scan.unreadable and scan.torn == 0)
            if last and fits and scan.used_rows + self.spec.block_size <= shard.capacity:
                self.active, self.next_row, self.next_record = shard, scan.used_rows, scan.next_index
                self.shards[shard.shard_id] = shard
                resumed = shard.shard_id
            else:
                shard.seal(scan.used_rows, scan.next_index)
                sealed.append(shard.shard_id)
        return RecoveryReport(len(shard_ids), resumed, self.next_row if resumed else 0, reindexed, sealed, removed)

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
