"""`opd cache stats`: entries and tokens (index and shards), bytes on disk and per token, hit/miss counters,
and the log of entries lookups found corrupt."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import redis as redis_lib

from cache.index import DEFAULT_REDIS_PREFIX, IndexEntry, RedisNames
from cache.layout import ShardUnavailable
from cache.ops.scan import open_parts
from cache.shards import Shard

COUNTERS = ("lookups", "hit_tokens", "miss_tokens", "corrupt_blocks", "puts", "blocks_written",
            "tokens_written", "bytes_written")


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
    croot, client, names = open_parts(root, redis, redis_prefix, storage_options)
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


def decode_corrupt_log(client: redis_lib.Redis, redis_prefix: str = DEFAULT_REDIS_PREFIX) -> dict[str, tuple[str, str, float]]:
    """Entries lookups found corrupt: key -> (shard, reason, unix time)."""
    names = RedisNames(redis_prefix)
    out: dict[str, tuple[str, str, float]] = {}
    for key, raw in client.hgetall(names.corrupt).items():
        shard, reason, at = msgpack.unpackb(raw)
        out[key.decode()] = (shard, reason, float(at))
    return out
