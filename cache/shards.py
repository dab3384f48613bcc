"""The teacher cache's on-disk half: Zarr shards, their manifests, writer locks, a decoded-chunk LRU.

Layout (root is a local directory or an fsspec URL zarr can open)::

    <root>/zarr.json                       root group, attrs {"format": "opd-teacher-cache", "version": 1}
    <root>/locks/<writer_id>.lock          local roots only: flock held by the live writer
    <root>/shards/<writer_id>/<seq>-<uid>/ one shard: fixed-capacity arrays, appended by one process
        logprobs_N        float32[N]        teacher logprob of the token at that row
        topk_ids_NK       int32[N, K]       (absent when K == 0; bit-shuffled, see `_compressors`)
        topk_logprobs_NK  float16|32[N, K]  (absent when K == 0)
        records_NR        uint8[N, 36]      the shard's manifest: one fixed-width record per entry

Why one writer per shard: zarr-python has no cross-process locking, and two processes writing the
same chunk (or resizing the same array) lose each other's data. So every writer process owns
`shards/<writer_id>/` (guarded by an flock on local roots) and only ever appends to its own arrays.
Arrays are created at their final capacity (`shard_rows`) so nobody ever resizes anything: readers
can hold array handles forever, and only chunk files change. When a shard is full the writer seals
it (attrs) and starts the next one, which is what lets `ops.evict` drop old shards whole.

Why checksums everywhere: LocalStore replaces chunk files by rename, so a chunk is never torn on a
local disk; every record carries its own CRC and every entry a CRC of its data anyway, so a torn or
corrupted chunk on any store reads as a miss, never as garbage.

Chunks are ~`chunk_bytes` (1 MiB) uncompressed per array, so a lookup decodes a whole chunk even
for a few rows. Readers keep a bounded LRU of decoded chunks; a stale cached chunk (the writer
appended to it since) shows up as a checksum mismatch and is re-read from disk once before the
entry counts as corrupt.

The order in which rows, records and index fields are written (and why a crash at any point is
safe) is in `cache.store`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync as zarr_sync
from zarr.errors import ContainsGroupError

ROOT_FORMAT = "opd-teacher-cache"
SHARD_FORMAT = "opd-teacher-cache-shard"
FORMAT_VERSION = 1
SHARDS = "shards"
LOCKS = "locks"
LOGPROBS = "logprobs_N"
TOPK_IDS = "topk_ids_NK"
TOPK_LOGPROBS = "topk_logprobs_NK"
RECORDS = "records_NR"
TOPK_DTYPES = ("float16", "float32")
COMPRESSIONS = ("blosc-lz4", "blosc-zstd", "zstd", "none")

_WRITER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MAGIC = b"OPDR"
RECORD_DTYPE = np.dtype(
    [("magic", "V4"), ("key", "V16"), ("row", "<u4"), ("length", "<u4"), ("checksum", "<u4"), ("rec_crc", "<u4")]
)
RECORD_BYTES = RECORD_DTYPE.itemsize
"""36 bytes: magic, 16-byte key, row, length, data CRC32, CRC32 of the preceding 32 bytes."""


class CacheError(RuntimeError):
    """A cache-level failure that is not bad input (e.g. the writer id is held by another process)."""


class ShardUnavailable(CacheError):
    """A shard cannot be opened: missing (evicted), not fully created, or unreadable metadata."""


class ShardIncomplete(ShardUnavailable):
    """A shard whose creation never finished (its writer died creating it): no entries, not damage."""


# ---------------------------------------------------------------------------------------------
# Records (the per-shard manifest) and checksums
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRecord:
    """One manifest record: entry `key_hex` is rows [row, row+length) of its shard, data CRC `checksum`."""

    index: int
    key_hex: str
    row: int
    length: int
    checksum: int

    @property
    def end(self) -> int:
        return self.row + self.length


def pack_records(records: Sequence[tuple[str, int, int, int]]) -> np.ndarray:
    """(key_hex, row, length, checksum) tuples -> uint8[n, RECORD_BYTES], each with its own CRC."""
    out = np.zeros(len(records), dtype=RECORD_DTYPE)
    for i, (key_hex, row, length, checksum) in enumerate(records):
        out[i]["magic"] = np.void(_MAGIC)
        out[i]["key"] = np.void(bytes.fromhex(key_hex))
        out[i]["row"], out[i]["length"], out[i]["checksum"] = row, length, checksum
        out[i]["rec_crc"] = zlib.crc32(out[i : i + 1].tobytes()[:32])
    return out.view(np.uint8).reshape(len(records), RECORD_BYTES)


def parse_records(raw_NR: np.ndarray, first_index: int) -> tuple[list[ShardRecord], int]:
    """Decode record slots; returns (valid records, count of non-empty slots that fail their CRC)."""
    raw_NR = np.ascontiguousarray(raw_NR, dtype=np.uint8)
    used = np.flatnonzero(raw_NR.any(axis=1))
    recs = raw_NR.view(RECORD_DTYPE).reshape(-1)
    out: list[ShardRecord] = []
    torn = 0
    for i in used.tolist():
        b = raw_NR[i].tobytes()
        if b[:4] != _MAGIC or zlib.crc32(b[:32]) != int(recs[i]["rec_crc"]):
            torn += 1
            continue
        r = recs[i]
        out.append(ShardRecord(first_index + i, b[4:20].hex(), int(r["row"]), int(r["length"]), int(r["checksum"])))
    return out, torn


def entry_checksum(logprobs_N: np.ndarray, topk_ids_NK: np.ndarray, topk_logprobs_NK: np.ndarray) -> int:
    """CRC32 over the stored bytes of one entry (logprobs, then top-k ids, then top-k logprobs)."""
    crc = zlib.crc32(np.ascontiguousarray(logprobs_N))
    if topk_ids_NK.size:
        crc = zlib.crc32(np.ascontiguousarray(topk_ids_NK), crc)
        crc = zlib.crc32(np.ascontiguousarray(topk_logprobs_NK), crc)
    return crc


# ---------------------------------------------------------------------------------------------
# Storage root, locks, shards
# ---------------------------------------------------------------------------------------------


async def _collect(it: AsyncIterator[str]) -> list[str]:
    return [x async for x in it]


def _compressors(name: str, *, bitshuffle: bool = False) -> Any:
    """The codec `name` stands for. `bitshuffle` (blosc only) shuffles bits instead of bytes.

    WHY bitshuffle for top-k ids: an id below 2^18 (a 152k vocabulary) leaves 14 of its 32 bits zero.
    Byte shuffle only removes the all-zero top byte (measured: 2.5 B per id with blosc-lz4); bitshuffle
    removes every zero bit plane, down to the ids' bit width (2.25 B per id for 152k ids, 2.0 for 32k).
    For floats it does not help (their mantissas are noise). The codec is recorded in each array's
    zarr.json, so shards written with byte shuffle read as before.
    """
    shuffle = "bitshuffle" if bitshuffle else "shuffle"
    if name == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)
    if name == "blosc-zstd":
        return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)
    if name == "zstd":
        return ZstdCodec(level=1)
    if name == "none":
        return None
    raise ValueError(f"compression must be one of {COMPRESSIONS}, got {name!r}")


def validate_writer_id(writer_id: str) -> str:
    if not isinstance(writer_id, str) or not _WRITER_ID.match(writer_id):
        raise ValueError(f"writer_id must match {_WRITER_ID.pattern} (it names a directory), got {writer_id!r}")
    return writer_id


class WriterLock:
    """An exclusive flock on `<root>/locks/<writer_id>.lock`; the kernel drops it when the process dies."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class CacheRoot:
    """The Zarr root of a cache: opens (or creates) it, lists, opens, sizes and deletes shards.

    Local directories get extras that object stores cannot offer: fsync of written chunk files and
    per-writer flocks. fsspec URLs work through zarr's FsspecStore without them.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool, storage_options: dict[str, Any] | None = None) -> None:
        url = os.fspath(root)
        if not url:
            raise ValueError("cache root must be a non-empty path or URL")
        self.url = url
        self.local: Path | None
        if "://" in url and not url.startswith("file://"):
            self.local = None
            self.store: Any = zarr.storage.FsspecStore.from_url(url, storage_options=storage_options, read_only=False)
        else:
            self.local = Path(url.removeprefix("file://")).resolve()
            if not create and not (self.local / "zarr.json").exists():
                raise FileNotFoundError(f"no teacher cache at {self.local} (missing zarr.json)")
            self.store = zarr.storage.LocalStore(self.local)
        if create:
            self.group = self._require_group("", {"format": ROOT_FORMAT, "version": FORMAT_VERSION})
        else:
            try:
                self.group = zarr.open_group(self.store, mode="r+")
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"no teacher cache at {url}") from exc
        if self.group.attrs.get("format") != ROOT_FORMAT:
            raise ValueError(f"{url} is a zarr group but not a teacher cache (attrs {dict(self.group.attrs)})")

    def _require_group(self, path: str, attributes: dict[str, Any] | None = None) -> zarr.Group:
        """Open or create a group; tolerant of another process creating it at the same moment."""
        try:
            return zarr.open_group(self.store, path=path, mode="r+")
        except FileNotFoundError:
            pass
        try:
            return zarr.create_group(self.store, path=path, attributes=attributes or {})
        except ContainsGroupError:
            return zarr.open_group(self.store, path=path, mode="r+")

    # -- listing ---------------------------------------------------------------------------------

    def _list(self, prefix: str) -> list[str]:
        return sorted(zarr_sync(_collect(self.store.list_dir(prefix))))

    def list_writers(self) -> list[str]:
        return [w for w in self._list(SHARDS) if _WRITER_ID.match(w)]

    def list_shards(self, writer_id: str | None = None) -> list[str]:
        """Shard ids (`writer/seq-uid`), in creation order per writer."""
        writers = [writer_id] if writer_id is not None else self.list_writers()
        out: list[str] = []
        for w in writers:
            out += [f"{w}/{s}" for s in self._list(f"{SHARDS}/{w}") if s[:1].isdigit()]
        return out

    def shard_path(self, shard_id: str) -> str:
        return f"{SHARDS}/{shard_id}"

    def shard_exists(self, shard_id: str) -> bool:
        return bool(zarr_sync(self.store.exists(f"{self.shard_path(shard_id)}/zarr.json")))

    def shard_nbytes(self, shard_id: str) -> int:
        """Bytes the shard's files take (file sizes), metadata included."""
        if self.local is not None:
            total = 0
            for dirpath, _dirs, files in os.walk(self.local / self.shard_path(shard_id)):
                for f in files:
                    with contextlib.suppress(FileNotFoundError):
                        total += os.stat(os.path.join(dirpath, f)).st_size
            return total
        return int(zarr_sync(self.store.getsize_prefix(self.shard_path(shard_id))))

    def delete_shard(self, shard_id: str) -> None:
        if self.local is not None:
            shutil.rmtree(self.local / self.shard_path(shard_id), ignore_errors=True)
        else:
            zarr_sync(self.store.delete_dir(self.shard_path(shard_id)))

    # -- durability and locks (local roots) ----------------------------------------------------

    def fsync_keys(self, keys: Iterable[str]) -> None:
        """fsync written files and their directories (renames are durable only once the dir is)."""
        if self.local is None:
            return
        dirs: set[Path] = set()
        for key in keys:
            path = self.local / key
            with contextlib.suppress(FileNotFoundError):  # zarr deletes chunks equal to the fill value
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            dirs.add(path.parent)
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def acquire_writer_lock(self, writer_id: str, timeout_s: float) -> WriterLock | None:
        """Lock `writer_id` for this process (None on non-local roots, which cannot flock).

        Raises CacheError if another live process holds it past `timeout_s`.
        """
        if self.local is None:
            return None
        path = self.local / LOCKS / f"{validate_writer_id(writer_id)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return WriterLock(path, fd)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise CacheError(
                        f"writer_id {writer_id!r} is held by another live process ({path}); "
                        "every writer process needs its own writer_id"
                    ) from None
                time.sleep(0.05)

    # -- shards ---------------------------------------------------------------------------------

    def create_shard(
        self, writer_id: str, *, k: int, topk_dtype: str, capacity: int, chunk_bytes: int, compression: str
    ) -> Shard:
        """A new empty shard for `writer_id`, named `<seq>-<uid>` so an id is never reused.

        Never reused matters: readers cache decoded chunks by shard id, and an evicted shard's id
        coming back with different data must not alias the cached chunks.
        """
        existing = self._list(f"{SHARDS}/{writer_id}")
        seq = 1 + max((int(s.split("-")[0]) for s in existing if s.split("-")[0].isdigit()), default=0)
        shard_id = f"{writer_id}/{seq:06d}-{uuid.uuid4().hex[:8]}"
        self._require_group(SHARDS)
        self._require_group(f"{SHARDS}/{writer_id}")
        now = time.time()
        group = zarr.create_group(
            self.store,
            path=self.shard_path(shard_id),
            attributes={
                "format": SHARD_FORMAT, "version": FORMAT_VERSION, "ready": False, "writer_id": writer_id,
                "k": k, "topk_dtype": topk_dtype, "capacity": capacity, "created_at": now, "sealed": False,
            },
        )
        comp = _compressors(compression)

        def rows_for(row_bytes: int) -> int:
            return max(1, min(capacity, chunk_bytes // row_bytes))

        group.create_array(LOGPROBS, shape=(capacity,), dtype="<f4", chunks=(rows_for(4),),
                           compressors=comp, fill_value=0.0)
        if k > 0:
            size = np.dtype(topk_dtype).itemsize
            group.create_array(TOPK_IDS, shape=(capacity, k), dtype="<i4", chunks=(rows_for(4 * k), k),
                               compressors=_compressors(compression, bitshuffle=True), fill_value=0)
            group.create_array(TOPK_LOGPROBS, shape=(capacity, k), dtype=np.dtype(topk_dtype).newbyteorder("<"),
                               chunks=(rows_for(size * k), k), compressors=comp, fill_value=0.0)
        # Records are rewritten on every put, so their chunks are kept small (1/16 of a data chunk):
        # the >= 1 MiB rule is about data throughput, and a 1 MiB record chunk would double put cost.
        group.create_array(RECORDS, shape=(capacity, RECORD_BYTES), dtype="u1",
                           chunks=(max(1, min(capacity, chunk_bytes // 16 // RECORD_BYTES)), RECORD_BYTES),
                           compressors=comp, fill_value=0)
        group.update_attributes({"ready": True})
        self.fsync_keys(
            [f"{self.shard_path(shard_id)}/{name}/zarr.json" for name in (LOGPROBS, TOPK_IDS, TOPK_LOGPROBS, RECORDS)]
            + [f"{self.shard_path(shard_id)}/zarr.json"]
        )
        return Shard.open(self, shard_id)


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
        return sorted(int(x) for x in self.root._list(f"{self.arrays[name].path}/c") if x.isdigit())

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
