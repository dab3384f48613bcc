"""The teacher cache's on-disk format: names, the manifest record, checksums, codecs, writer ids.

Layout (root is a local directory or an fsspec URL zarr can open)::

    <root>/zarr.json                       root group, attrs {"format": "opd-teacher-cache", "version": 1}
    <root>/locks/<writer_id>.lock          local roots only: flock held by the live writer
    <root>/shards/<writer_id>/<seq>-<uid>/ one shard: fixed-capacity arrays, appended by one process
        logprobs_N        float32[N]        teacher logprob of the token at that row
        topk_ids_NK       int32[N, K]       (absent when K == 0; bit-shuffled, see `compressors`)
        topk_logprobs_NK  float16|32[N, K]  (absent when K == 0)
        records_NR        uint8[N, 36]      the shard's manifest: one fixed-width record per entry

Why checksums everywhere: LocalStore replaces chunk files by rename, so a chunk is never torn on a
local disk; every record carries its own CRC and every entry a CRC of its data anyway, so a torn or
corrupted chunk on any store reads as a miss, never as garbage.

The root (listing, locks, durability) is `cache.root`; one shard (writing, reading, the chunk LRU) is
`cache.shards`; the order in which rows, records and index fields are written (and why a crash at any
point is safe) is in `cache.store`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

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

WRITER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
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
# Codecs and writer ids
# ---------------------------------------------------------------------------------------------


def compressors(name: str, *, bitshuffle: bool = False) -> Any:
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
    if not isinstance(writer_id, str) or not WRITER_ID_PATTERN.match(writer_id):
        raise ValueError(f"writer_id must match {WRITER_ID_PATTERN.pattern} (it names a directory), got {writer_id!r}")
    return writer_id
