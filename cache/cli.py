"""`opd cache ...`: operate the teacher cache from a shell (stats, verify, rebuild-index, evict, warm).

`opd/commands.py` loads and validates the config, then calls `run`. The cache root is
`teacher.cache_dir`; the Redis index lives under `<transport.namespace>:cache`, the prefix every
teacher of that namespace uses, so these commands see exactly what the running teachers see.

Exit codes, and why three: scripts (and CI) must tell "the cache is damaged" from "you asked
wrongly". 0: done, nothing wrong. 1: `verify` found problems, or the operation failed (Redis
unreachable, a cache write failed). 2: bad usage: a missing or wrong setting (no Redis URL, no
eviction budget, no cache at `teacher.cache_dir`) or bad input lines; the message names what to fix.

`warm` (offline teacher caching) lives in `cache/warm.py`.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter as Tally
from collections.abc import Callable

import redis

from cache.config import TeacherConfig
from cache.console import UsageError, checked_redis, human_bytes, print_json, report_error, table
from protocol.config import TransportConfig
from protocol.names import Names
from protocol.reconnect import redact_url


def run(command: str, cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    """Run `opd cache <command>`; returns the process exit code (see module docs)."""
    handlers: dict[str, Callable[[TeacherConfig, TransportConfig, argparse.Namespace], int]] = {
        "stats": _stats, "verify": _verify, "rebuild-index": _rebuild_index, "evict": _evict, "warm": _warm,
    }
    handler = handlers.get(command)
    if handler is None:
        report_error(command, f"unknown cache command {command!r} (known: {', '.join(handlers)})")
        return 2
    from cache.layout import CacheError

    try:
        return handler(cfg, transport, args)
    except UsageError as exc:
        report_error(command, str(exc))
        return 2
    except redis.RedisError as exc:
        report_error(command, f"Redis at {redact_url(transport.redis_url or '')} failed: {type(exc).__name__}: {exc}")
        return 1
    except CacheError as exc:
        report_error(command, str(exc))
        return 1


# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------


def _existing_root(cfg: TeacherConfig) -> str:
    """teacher.cache_dir, checked to hold a teacher cache (commands other than warm never create one)."""
    from cache.root import CacheRoot

    try:
        CacheRoot(cfg.cache_dir, create=False)
    except FileNotFoundError as exc:
        raise UsageError(f"teacher.cache_dir={cfg.cache_dir!r}: {exc}; point it at a cache a teacher or "
                         "`opd cache warm` wrote") from None
    except ValueError as exc:
        raise UsageError(f"teacher.cache_dir={cfg.cache_dir!r}: {exc}") from None
    return cfg.cache_dir


def _prefix(transport: TransportConfig) -> str:
    return Names(transport.namespace).key("cache")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts > 0 else "never"


# ---------------------------------------------------------------------------------------------
# stats / verify / rebuild-index / evict
# ---------------------------------------------------------------------------------------------


def _stats(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache import ops

    root = _existing_root(cfg)
    client = checked_redis("stats", transport)
    st = ops.stats(root, client, redis_prefix=_prefix(transport))
    if getattr(args, "json", False):
        print_json({"root": root, "redis_prefix": _prefix(transport), **st.to_dict()})
        return 0
    c = st.counters
    looked = c["hit_tokens"] + c["miss_tokens"]
    rows = [
        ("entries (indexed)", f"{st.entries:,}"),
        ("tokens (indexed)", f"{st.indexed_tokens:,}"),
        ("entries (in shards)", f"{st.stored_entries:,}"),
        ("tokens (in shards)", f"{st.stored_tokens:,}"),
        ("shards", f"{st.shards:,} ({st.sealed_shards:,} sealed)"),
        ("bytes on disk", f"{human_bytes(st.bytes_on_disk)} ({st.bytes_on_disk:,} B)"),
        ("bytes per token", f"{st.bytes_per_token:,.1f}"),
        ("hit rate", f"{100 * st.hit_rate:.1f}% ({c['hit_tokens']:,} of {looked:,} looked-up tokens)"),
    ]
    rows += [(f"counter {k}", f"{v:,}") for k, v in sorted(c.items())]
    print(f"teacher cache {root} (redis prefix {_prefix(transport)})")
    print(table(rows))
    return 0


def _verify(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache import ops

    root = _existing_root(cfg)
    client = checked_redis("verify", transport)
    report = ops.verify(root, client, redis_prefix=_prefix(transport), check_data=not getattr(args, "quick", False),
                        repair=getattr(args, "repair", False))
    if getattr(args, "json", False):
        print_json(report.to_dict())
        return 0 if report.ok else 1
    print(report.summary())
    bad_shards = Tally(b.shard for b in report.bad)
    bad_shards.update(d.shard for d in report.dangling if d.shard != "?")
    for shard, n in sorted(bad_shards.items()):
        print(f"  bad shard {shard}: {n} bad or dangling entries")
    for shard in report.incomplete_shards:
        print(f"  incomplete shard {shard} (its writer died creating it; holds nothing, not a problem)")
    if report.unindexed:
        print(f"  {len(report.unindexed)} good records have no index field (not a problem; "
              "`opd cache rebuild-index` indexes them)")
    if getattr(args, "repair", False):
        print(f"  repaired {report.repaired} index fields")
    return 0 if report.ok else 1


def _rebuild_index(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache import ops

    root = _existing_root(cfg)
    client = checked_redis("rebuild-index", transport)
    report = ops.rebuild_index(root, client, redis_prefix=_prefix(transport),
                               check_data=not getattr(args, "quick", False))
    if getattr(args, "json", False):
        print_json(report.to_dict())
        return 0
    print(f"rebuild-index: {report.shards} shards, {report.records} records")
    print(table([
        ("index fields added", f"{report.added:,}"),
        ("replaced (pointed at bad/missing data)", f"{report.replaced:,}"),
        ("removed (no good record behind them)", f"{report.removed:,}"),
        ("already correct", f"{report.kept:,}"),
        ("bad entries not indexed", f"{report.bad_skipped:,}"),
    ]))
    return 0


def _evict(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache import ops

    if cfg.cache_budget_bytes is None:
        raise UsageError("opd cache evict needs a budget: set teacher.cache_budget_bytes in the config or pass "
                         "--set teacher.cache_budget_bytes=BYTES (e.g. 50000000000 for 50 GB)")
    root = _existing_root(cfg)
    client = checked_redis("evict", transport)
    report = ops.evict(root, client, cfg.cache_budget_bytes, redis_prefix=_prefix(transport),
                       dry_run=getattr(args, "dry_run", False))
    if getattr(args, "json", False):
        print_json(report.to_dict())
        return 0
    verb = "would evict" if report.dry_run else "evicted"
    print(f"evict: budget {human_bytes(report.budget_bytes)}: {human_bytes(report.bytes_before)} before, "
          f"{human_bytes(report.bytes_after)} after; {verb} {len(report.removed)} shards")
    for e in report.removed:
        print(f"  {verb} {e.shard}: {human_bytes(e.nbytes)}, last hit {_when(e.last_hit)}, "
              f"{e.index_fields_removed} index fields removed")
    for sid in report.active_kept:
        print(f"  kept {sid}: active shard of a live writer")
    if report.over_budget:
        print(f"  still over budget by {human_bytes(report.bytes_after - report.budget_bytes)}: only live writers' "
              "active shards are left (they are never removed)")
    return 0


def _warm(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache.warm import warm

    return warm(cfg, transport, args)
