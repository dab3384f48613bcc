"""`opd cache rebuild-index`: make the index agree with the shards, the source of truth, without stopping
writers."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import redis as redis_lib

from cache.index import DEFAULT_REDIS_PREFIX, IndexEntry, delete_index_if_equal
from cache.ops.scan import open_parts, read_index, scan_shard


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
    croot, client, names = open_parts(root, redis, redis_prefix, storage_options)
    index = read_index(client, names)
    scans = [scan_shard(croot, sid, check_data=check_data) for sid in croot.list_shards()]
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


