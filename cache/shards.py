"""One shard of the teacher cache: fixed-capacity arrays plus their manifest, written by one process,
read through a bounded LRU of decoded chunks.

Arrays are created at their final capacity (`shard_rows`) so nobody ever resizes anything: readers
can hold array handles forever, and only chunk files change. When a shard is full the writer seals
it (attrs) and starts the next one, which is what lets `ops.evict` drop old shards whole.

Chunks are ~`chunk_bytes` (1 MiB) uncompressed per array, so a lookup decodes a whole chunk even
for a few rows. Readers keep a bounded LRU of decoded chunks; a stale cached chunk (the writer
appended to it since) shows up as a checksum mismatch and is re-read from disk once before the
entry counts as corrupt.

The names and record format are in `cache.layout`, the root that holds the shards in `cache.root`; the
order in which rows, records and index fields are written (and why a crash at any point is safe) is in
`cache.store`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from cache.layout import (
    FORMAT_VERSION,
    LOGPROBS,
    RECORD_BYTES,
    RECORDS,
    SHARD_FORMAT,
    SHARDS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    CacheError,
    ShardIncomplete,
    ShardRecord,
    ShardUnavailable,
    compressors,
    parse_records,
)
from cache.root import CacheRoot


@dataclass
class RecordScan:
    """What a shard's manifest holds: valid records, torn slots and unreadable record chunks."""

    records: list[ShardRecord]
    torn: int
    unreadable: list[str]

    @property
    def next_index(self) -> int:
        return 1 + max((r.index for r in self.records), default=-1)

    @property
    def used_rows(self) -> int:
        return max((r.end for r in self.records), default=0)


class Shard:
    """One shard: fixed-capacity arrays plus their record array, written by a single process."""

    def __init__(self, root: CacheRoot, shard_id: str, group: zarr.Group) -> None:
        self.root = root
        self.shard_id = shard_id
        self.group = group
        attrs = dict(group.attrs)
        self.attrs = attrs
        self.k = int(attrs["k"])
        self.topk_dtype = np.dtype(str(attrs["topk_dtype"]))
        self.capacity = int(attrs["capacity"])
        self.arrays: dict[str, Any] = {LOGPROBS: group[LOGPROBS], RECORDS: group[RECORDS]}
        if self.k > 0:
            self.arrays[TOPK_IDS] = group[TOPK_IDS]
            self.arrays[TOPK_LOGPROBS] = group[TOPK_LOGPROBS]
        self.chunk_rows = {name: int(arr.chunks[0]) for name, arr in self.arrays.items()}

    @classmethod
    def create(
        cls, root: CacheRoot, writer_id: str, *, k: int, topk_dtype: str, capacity: int, chunk_bytes: int, compression: str
    ) -> Shard:
        """A new empty shard for `writer_id`, named `<seq>-<uid>` so an id is never reused.

        Never reused matters: readers cache decoded chunks by shard id, and an evicted shard's id
        coming back with different data must not alias the cached chunks. A creation that fails (a
        full disk) removes what it made, so a teacher retrying on a full disk leaves no litter.
        """
        existing = root.list_dir(f"{SHARDS}/{writer_id}")
        seq = 1 + max((int(s.split("-")[0]) for s in existing if s.split("-")[0].isdigit()), default=0)
        shard_id = f"{writer_id}/{seq:06d}-{uuid.uuid4().hex[:8]}"
        try:
            _build(root, shard_id, writer_id, k=k, topk_dtype=topk_dtype, capacity=capacity, chunk_bytes=chunk_bytes,
                   compression=compression)
        except BaseException:
            with contextlib.suppress(Exception):
                root.delete_shard(shard_id)
            raise
        return cls.open(root, shard_id)

    @classmethod
    def open(cls, root: CacheRoot, shard_id: str) -> Shard:
        try:
            group = zarr.open_group(root.store, path=root.shard_path(shard_id), mode="r+")
            if group.attrs.get("format") != SHARD_FORMAT:
                raise ShardUnavailable(f"shard {shard_id}: not a cache shard (attrs {dict(group.attrs)})")
            if not group.attrs.get("ready"):
                raise ShardIncomplete(f"shard {shard_id}: creation never finished")
            return cls(root, shard_id, group)
        except ShardUnavailable:
            raise
        except Exception as exc:  # missing dir, bad JSON, missing array: all mean "cannot use it"
            raise ShardUnavailable(f"shard {shard_id}: cannot open ({type(exc).__name__}: {exc})") from exc

    @property
    def sealed(self) -> bool:
        return bool(self.attrs.get("sealed"))

    @property
    def writer_id(self) -> str:
        return str(self.attrs.get("writer_id", self.shard_id.split("/")[0]))

    @property
    def created_at(self) -> float:
        return float(self.attrs.get("created_at", 0.0))

    @property
    def data_names(self) -> tuple[str, ...]:
        return (LOGPROBS, TOPK_IDS, TOPK_LOGPROBS) if self.k > 0 else (LOGPROBS,)

    @property
    def row_bytes(self) -> int:
        """Uncompressed bytes of one row across the data arrays."""
        return 4 + self.k * (4 + self.topk_dtype.itemsize)

    def chunk_key(self, name: str, chunk: int) -> str:
        arr = self.arrays[name]
        coords = (chunk,) if arr.ndim == 1 else (chunk, 0)
        return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"

    def chunk_keys(self, name: str, row: int, end: int) -> list[str]:
        c = self.chunk_rows[name]
        return [self.chunk_key(name, i) for i in range(row // c, (end - 1) // c + 1)]

    # -- writing (only by the owning writer) -----------------------------------------------------

    def write_rows(self, row: int, logprobs_N: np.ndarray, topk_ids_NK: np.ndarray, topk_logprobs_NK: np.ndarray) -> list[str]:
        """Write rows [row, row+n) of every data array; returns the chunk keys it rewrote."""
        end = row + int(logprobs_N.shape[0])
        if end > self.capacity:
            raise CacheError(f"shard {self.shard_id}: rows [{row}, {end}) exceed capacity {self.capacity}")
        self.arrays[LOGPROBS][row:end] = logprobs_N
        touched = self.chunk_keys(LOGPROBS, row, end)
        if self.k > 0:
            self.arrays[TOPK_IDS][row:end] = topk_ids_NK
            self.arrays[TOPK_LOGPROBS][row:end] = topk_logprobs_NK
            touched += self.chunk_keys(TOPK_IDS, row, end) + self.chunk_keys(TOPK_LOGPROBS, row, end)
        return touched

    def write_records(self, first: int, records_NR: np.ndarray) -> list[str]:
        end = first + int(records_NR.shape[0])
        if end > self.capacity:
            raise CacheError(f"shard {self.shard_id}: records [{first}, {end}) exceed capacity {self.capacity}")
        self.arrays[RECORDS][first:end] = records_NR
        return self.chunk_keys(RECORDS, first, end)

    def seal(self, scan_rows: int, scan_records: int) -> None:
        """Mark the shard complete: it is never written again and may be evicted whole."""
        self.group.update_attributes({"sealed": True, "rows": scan_rows, "records": scan_records, "sealed_at": time.time()})
        self.attrs = dict(self.group.attrs)
        self.root.fsync_keys([f"{self.root.shard_path(self.shard_id)}/zarr.json"])

    # -- reading -------------------------------------------------------------------------------

    def read_rows(self, row: int, end: int, lru: ChunkLRU | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [row, end) of (logprobs_N, topk_ids_NK, topk_logprobs_NK); may raise on bad chunks."""
        if not 0 <= row < end <= self.capacity:
            raise ValueError(f"shard {self.shard_id}: bad row range [{row}, {end}) for capacity {self.capacity}")
        lp = self._read(LOGPROBS, row, end, lru)
        if self.k == 0:
            return lp, np.zeros((end - row, 0), np.int32), np.zeros((end - row, 0), self.topk_dtype)
        return lp, self._read(TOPK_IDS, row, end, lru), self._read(TOPK_LOGPROBS, row, end, lru)

    def _read(self, name: str, row: int, end: int, lru: ChunkLRU | None) -> np.ndarray:
        arr = self.arrays[name]
        if lru is None or not lru.enabled:
            return np.asarray(arr[row:end])
        c = self.chunk_rows[name]
        first, last = row // c, (end - 1) // c
        chunks: dict[int, np.ndarray] = {}
        todo: list[int] = []
        for i in range(first, last + 1):
            got = lru.get((self.shard_id, name, i))
            if got is None:
                todo.append(i)
            else:
                chunks[i] = got
        for run in _runs(todo):
            lo, hi = run[0] * c, min((run[-1] + 1) * c, self.capacity)
            data = np.asarray(arr[lo:hi])
            for i in run:
                piece = data[i * c - lo : min((i + 1) * c, self.capacity) - lo]
                piece = piece.copy() if len(run) > 1 else piece
                chunks[i] = piece
                lru.put((self.shard_id, name, i), piece)
        if first == last:
            return chunks[first][row - first * c : end - first * c]
        parts = [chunks[i][max(row, i * c) - i * c : min(end, (i + 1) * c) - i * c] for i in range(first, last + 1)]
        return np.concatenate(parts)

    def list_chunks(self, name: str) -> list[int]:
        """Indices of the chunk files that exist for one array (written chunks)."""
        return sorted(int(x) for x in self.root.list_dir(f"{self.arrays[name].path}/c") if x.isdigit())

    def read_records(self) -> RecordScan:
        """Scan the record array chunk by chunk; an unreadable chunk is reported, not raised."""
        arr = self.arrays[RECORDS]
        c = self.chunk_rows[RECORDS]
        if self.sealed and isinstance(self.attrs.get("records"), int):
            chunks = list(range(0, (int(self.attrs["records"]) + c - 1) // c))
        else:
            chunks = self.list_chunks(RECORDS)
        records: list[ShardRecord] = []
        torn = 0
        unreadable: list[str] = []
        for i in chunks:
            try:
                raw = np.asarray(arr[i * c : min((i + 1) * c, self.capacity)])
            except Exception as exc:  # a damaged chunk file: report it, keep scanning the rest
                unreadable.append(f"{self.chunk_key(RECORDS, i)} ({type(exc).__name__}: {exc})")
                continue
            recs, bad = parse_records(raw, i * c)
            records += recs
            torn += bad
        return RecordScan(records, torn, unreadable)


def _build(root: CacheRoot, shard_id: str, writer_id: str, *, k: int, topk_dtype: str, capacity: int, chunk_bytes: int,
           compression: str) -> None:
    """Write a new shard's group and arrays, then mark it ready (fsynced): `Shard.create`'s body."""
    root.require_group(SHARDS)
    root.require_group(f"{SHARDS}/{writer_id}")
    now = time.time()
    group = zarr.create_group(
        root.store,
        path=root.shard_path(shard_id),
        attributes={
            "format": SHARD_FORMAT, "version": FORMAT_VERSION, "ready": False, "writer_id": writer_id,
            "k": k, "topk_dtype": topk_dtype, "capacity": capacity, "created_at": now, "sealed": False,
        },
    )
    comp = compressors(compression)

    def rows_for(row_bytes: int) -> int:
        return max(1, min(capacity, chunk_bytes // row_bytes))

    group.create_array(LOGPROBS, shape=(capacity,), dtype="<f4", chunks=(rows_for(4),),
                       compressors=comp, fill_value=0.0)
    if k > 0:
        size = np.dtype(topk_dtype).itemsize
        group.create_array(TOPK_IDS, shape=(capacity, k), dtype="<i4", chunks=(rows_for(4 * k), k),
                           compressors=compressors(compression, bitshuffle=True), fill_value=0)
        group.create_array(TOPK_LOGPROBS, shape=(capacity, k), dtype=np.dtype(topk_dtype).newbyteorder("<"),
                           chunks=(rows_for(size * k), k), compressors=comp, fill_value=0.0)
    # Records are rewritten on every put, so their chunks are kept small (1/16 of a data chunk):
    # the >= 1 MiB rule is about data throughput, and a 1 MiB record chunk would double put cost.
    group.create_array(RECORDS, shape=(capacity, RECORD_BYTES), dtype="u1",
                       chunks=(max(1, min(capacity, chunk_bytes // 16 // RECORD_BYTES)), RECORD_BYTES),
                       compressors=comp, fill_value=0)
    group.update_attributes({"ready": True})
    root.fsync_keys(
        [f"{root.shard_path(shard_id)}/{name}/zarr.json" for name in (LOGPROBS, TOPK_IDS, TOPK_LOGPROBS, RECORDS)]
        + [f"{root.shard_path(shard_id)}/zarr.json"]
    )


def _runs(indices: list[int]) -> list[list[int]]:
    """Split sorted ints into runs of consecutive values."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


class ChunkLRU:
    """Decoded chunks by (shard, array, chunk index), bounded in bytes, least recently used out first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._d: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: tuple[str, str, int]) -> np.ndarray | None:
        got = self._d.get(key)
        if got is not None:
            self._d.move_to_end(key)
        return got

    def put(self, key: tuple[str, str, int], arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        self.drop(key)
        self._d[key] = arr
        self.nbytes += arr.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self._d.popitem(last=False)
            self.nbytes -= old.nbytes

    def drop(self, key: tuple[str, str, int]) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes

    def drop_rows(self, shard: Shard, row: int, end: int) -> None:
        for name in shard.data_names:
            c = shard.chunk_rows[name]
            for i in range(row // c, (end - 1) // c + 1):
                self.drop((shard.shard_id, name, i))

    def drop_shard(self, shard_id: str) -> None:
        for key in [k for k in self._d if k[0] == shard_id]:
            self.drop(key)
