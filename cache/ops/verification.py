"""`opd cache verify`: the index against the shards, and every stored entry against its checksum.

The index is read *before* the shards are scanned: an entry a writer adds meanwhile has its record
written before its index field, so it cannot show up as dangling.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import redis as redis_lib

from cache.index import DEFAULT_REDIS_PREFIX, IndexEntry, delete_index_if_equal
from cache.layout import ShardRecord
from cache.ops.scan import BadEntry, open_parts, read_index, scan_shard


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
    croot, client, names = open_parts(root, redis, redis_prefix, storage_options)
    index = read_index(client, names)  # before the shard scan: see module docs
    report = VerifyReport(index_entries=len(index))
    scans = [scan_shard(croot, sid, check_data=check_data) for sid in croot.list_shards()]
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


