"""Operating the teacher cache: stats, verify, rebuild_index, evict (one module each).

These take the cache root and Redis rather than a `TeacherCache`, so an operator can run them from
any process (`opd cache ...`) while teachers keep reading and writing. Why eviction works on whole
shards, and why it never races a writer, is in `cache.ops.eviction`; why `verify` cannot report an
entry being added as dangling, in `cache.ops.verification`. What they share (scanning a shard,
reading the index) is `cache.ops.scan`.
"""

from cache.ops.eviction import EvictedShard, EvictReport, evict
from cache.ops.rebuild import RebuildReport, rebuild_index
from cache.ops.scan import BadEntry
from cache.ops.usage import COUNTERS, CacheStats, decode_corrupt_log, stats
from cache.ops.verification import IndexProblem, VerifyReport, verify

__all__ = [
    "COUNTERS", "BadEntry", "CacheStats", "EvictReport", "EvictedShard", "IndexProblem", "RebuildReport", "VerifyReport",
    "decode_corrupt_log", "evict", "rebuild_index", "stats", "verify",
]
