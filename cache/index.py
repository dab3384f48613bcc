"""The teacher cache's Redis index: block key -> where that entry's rows live in the shards.

Why Redis is only an index: the shards are the source of truth. The index maps block key ->
msgpack([shard, row, length, checksum]) and can be rebuilt from the shards' records alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import msgpack
import redis as redis_lib

from protocol.names import Names

DEFAULT_REDIS_PREFIX = Names().key("cache")


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
