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
import json
import sys
import time
from collections import Counter as Tally
from collections.abc import Callable

import redis

from cache.config import TeacherConfig
from protocol.config import TransportConfig
from protocol.names import Names
from protocol.reconnect import redact_url
from protocol.streams import connect

MAX_REPORTED_LINE_ERRORS = 10


class UsageError(ValueError):
    """Bad command line, config or input: exit code 2, with a message naming what to fix."""


def run(command: str, cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    """Run `opd cache <command>`; returns the process exit code (see module docs)."""
    handlers: dict[str, Callable[[TeacherConfig, TransportConfig, argparse.Namespace], int]] = {
        "stats": _stats, "verify": _verify, "rebuild-index": _rebuild_index, "evict": _evict, "warm": _warm,
    }
    handler = handlers.get(command)
    if handler is None:
        _error(command, f"unknown cache command {command!r} (known: {', '.join(handlers)})")
        return 2
    from cache.layout import CacheError

    try:
        return handler(cfg, transport, args)
    except UsageError as exc:
        _error(command, str(exc))
        return 2
    except redis.RedisError as exc:
        _error(command, f"Redis at {redact_url(transport.redis_url or '')} failed: {type(exc).__name__}: {exc}")
        return 1
    except CacheError as exc:
        _error(command, str(exc))
        return 1


# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------


def _error(command: str, message: str) -> None:
    print(f"opd cache {command}: error: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _redis(command: str, transport: TransportConfig) -> redis.Redis:
    """A checked Redis client (one PING), or a UsageError when no URL is configured."""
    if not transport.redis_url:
        raise UsageError(f"opd cache {command} needs transport.redis_url (or OPD_REDIS_URL), "
                         "e.g. --set transport.redis_url=redis://127.0.0.1:6379/0")
    client = connect(transport.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise redis.ConnectionError(f"cannot reach it ({exc})") from None
    return client


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


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, like du -h)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts > 0 else "never"


# ---------------------------------------------------------------------------------------------
# stats / verify / rebuild-index / evict
# ---------------------------------------------------------------------------------------------


def _stats(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache import ops

    root = _existing_root(cfg)
    client = _redis("stats", transport)
    st = ops.stats(root, client, redis_prefix=_prefix(transport))
    if getattr(args, "json", False):
        _print_json({"root": root, "redis_prefix": _prefix(transport), **st.to_dict()})
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
    print(_table(rows))
    return 0


def _verify(cfg: TeacherConfig, transport: TransportConfig, args: argparse.Namespace) -> int:
    from cache import ops

    root = _existing_root(cfg)
    client = _redis("verify", transport)
    report = ops.verify(root, client, redis_prefix=_prefix(transport), check_data=not getattr(args, "quick", False),
                        repair=getattr(args, "repair", False))
    if getattr(args, "json", False):
        _print_json(report.to_dict())
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
    client = _redis("rebuild-index", transport)
    report = ops.rebuild_index(root, client, redis_prefix=_prefix(transport),
                               check_data=not getattr(args, "quick", False))
    if getattr(args, "json", False):
        _print_json(report.to_dict())
        return 0
    print(f"rebuild-index: {report.shards} shards, {report.records} records")
    print(_table([
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
    client = _redis("evict", transport)
    report = ops.evict(root, client, cfg.cache_budget_bytes, redis_prefix=_prefix(transport),
                       dry_run=getattr(args, "dry_run", False))
    if getattr(args, "json", False):
        _print_json(report.to_dict())
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
