"""The teacher's content-addressed logprob cache: Zarr shards on disk, a Redis index for speed.

Layout (root is a local directory or an fsspec URL zarr can open)::

    <root>/zarr.json                       root group, attrs {"format": "opd-teacher-cache", "version": 1}
    <root>/locks/<writer_id>.lock          local roots only: flock held by the live writer
    <root>/shards/<writer_id>/<seq>-<uid>/ one shard: fixed-capacity arrays, appended by one process
        logprobs_N        float32[N]        teacher logprob of the token at that row
        topk_ids_NK       int32[N, K]       (absent when K == 0)
        topk_logprobs_NK  float16|32[N, K]  (absent when K == 0)
        records_NR        uint8[N, 36]      the shard's manifest: one fixed-width record per entry

Why one writer per shard: zarr-python has no cross-process locking, and two processes writing the
same chunk (or resizing the same array) lose each other's data. So every writer process owns
`shards/<writer_id>/` (guarded by an flock on local roots) and only ever appends to its own arrays.
Arrays are created at their final capacity (`shard_rows`) so nobody ever resizes anything: readers
can hold array handles forever, and only chunk files change. When a shard is full the writer seals
it (attrs) and starts the next one, which is what lets `ops.evict` drop old shards whole.

Why this write order: rows are written (and fsynced) first, then the entry's manifest record, then
the Redis index field, and a shard is sealed only after all its records are indexed. An entry is
therefore visible (indexed) only once its bytes are durable, and a writer killed at any point leaves
unreferenced rows (no record: ignored, and overwritten when the writer resumes), records without an
index field (only ever in the active shard, which the restarted writer re-indexes; or use
`ops.rebuild_index`), or a shard whose creation never finished (no entries; the restarted writer
deletes it).
LocalStore replaces chunk files by rename, so a chunk is never torn on a local disk; every record
carries its own CRC and every entry a CRC of its data anyway, so a torn or corrupted chunk on any
store reads as a miss, never as garbage.

Why Redis is only an index: the shards are the source of truth. The index maps block key ->
msgpack([shard, row, length, checksum]) and can be rebuilt from the shards' records alone.

Values: row t of an entry covering positions [start, end) holds the score of token t given all
tokens before it. Position 0 has no teacher score: its row holds NaN logprobs and top-k ids 0.

Chunks are ~`chunk_bytes` (1 MiB) uncompressed per array, so a lookup decodes a whole chunk even
for a few rows. Readers keep a bounded LRU of decoded chunks; a stale cached chunk (the writer
appended to it since) shows up as a checksum mismatch and is re-read from disk once before the
entry counts as corrupt.

A `TeacherCache` is not thread-safe: use one per thread (processes are the unit of concurrency).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack
import numpy as np
import redis as redis_lib
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync as zarr_sync
from zarr.errors import ContainsGroupError

from cache.keys import BlockKey, as_token_ids, block_keys, cache_namespace
from protocol.names import Names

log = logging.getLogger(__name__)

DEFAULT_REDIS_PREFIX = Names().key("cache")
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
# Redis side
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisNames:
    """Redis keys of one cache (one root): give each root its own prefix."""

    prefix: str = DEFAULT_REDIS_PREFIX

    @property
    def index(self) -> str:
        """Hash: block key hex -> msgpack([shard, row, length, checksum])."""
        return f"{self.prefix}:index"

    @property
    def counters(self) -> str:
        """Hash of cumulative counters (hit_tokens, miss_tokens, tokens_written, ...)."""
        return f"{self.prefix}:counters"

    @property
    def shard_hits(self) -> str:
        """Sorted set: shard id -> unix time of its last hit (creation time until first hit)."""
        return f"{self.prefix}:shard_hits"

    @property
    def corrupt(self) -> str:
        """Hash: block key hex -> msgpack([shard, reason, unix time]) of entries found corrupt."""
        return f"{self.prefix}:corrupt"


@dataclass(frozen=True)
class IndexEntry:
    """Where an entry's rows live: `length` rows of `shard` from `row`, with a CRC32 of the data."""

    shard: str
    row: int
    length: int
    checksum: int

    @property
    def end(self) -> int:
        return self.row + self.length

    def pack(self) -> bytes:
        return msgpack.packb([self.shard, self.row, self.length, self.checksum])

    @classmethod
    def unpack(cls, raw: bytes) -> IndexEntry:
        """Decode an index value; a malformed one raises ValueError saying what is wrong."""
        try:
            value = msgpack.unpackb(raw)
        except Exception as exc:  # msgpack raises several unrelated types for bad bytes
            raise ValueError(f"index value is not msgpack: {exc}") from exc
        if not (isinstance(value, list) and len(value) == 4):
            raise ValueError(f"index value must be [shard, row, length, checksum], got {value!r}")
        shard, row, length, checksum = value
        if not isinstance(shard, str) or not all(isinstance(v, int) and v >= 0 for v in (row, length, checksum)):
            raise ValueError(f"index value has bad field types: {value!r}")
        if length < 1:
            raise ValueError(f"index value has length {length} < 1")
        return cls(shard, row, length, checksum)


def connect_redis(redis: redis_lib.Redis | str) -> redis_lib.Redis:
    """A client from a URL or an existing client; index values are bytes, so no decode_responses."""
    if isinstance(redis, str):
        return redis_lib.Redis.from_url(redis)
    if not isinstance(redis, redis_lib.Redis):
        raise TypeError(f"redis must be a redis.Redis or a URL str, got {type(redis).__name__}")
    if redis.connection_pool.connection_kwargs.get("decode_responses"):
        raise ValueError("redis client must have decode_responses=False (index values are msgpack bytes)")
    return redis


_DELETE_IF_EQUAL = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""


def delete_index_if_equal(client: redis_lib.Redis, names: RedisNames, pairs: Iterable[tuple[str, bytes]]) -> int:
    """HDEL each key only if it still maps to the given value (atomic per batch, in a Lua script).

    Why compare-and-delete: another writer may have re-stored the same block elsewhere since we
    read the index; a blind HDEL would throw away its good entry.
    """
    removed = 0
    batch: list[str | bytes] = []
    for key_hex, value in pairs:
        batch += [key_hex, value]
        if len(batch) >= 2000:
            removed += int(client.eval(_DELETE_IF_EQUAL, 1, names.index, *batch))
            batch = []
    if batch:
        removed += int(client.eval(_DELETE_IF_EQUAL, 1, names.index, *batch))
    return removed


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


def _compressors(name: str) -> Any:
    if name == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    if name == "blosc-zstd":
        return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
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
                               compressors=comp, fill_value=0)
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


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


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
        _compressors(compression)
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
        shard = self.root.create_shard(
            self.writer_id, k=self.k, topk_dtype=self.topk_dtype.name, capacity=self.shard_rows,
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
