"""What every `opd cache` command shares: the usage error, stderr notes, a checked Redis client, output.

Why its own module: `cache/cli.py` dispatches to `cache/warm.py`, and warm reports the same way; with
these helpers in the dispatcher, warm imported its own caller back (an import cycle). Both import this.
"""

from __future__ import annotations

import json
import sys

import redis

from protocol.config import TransportConfig
from protocol.streams import connect

MAX_REPORTED_LINE_ERRORS = 10


class UsageError(ValueError):
    """Bad command line, config or input: exit code 2, with a message naming what to fix."""


def report_error(command: str, message: str) -> None:
    print(f"opd cache {command}: error: {message}", file=sys.stderr)


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def checked_redis(command: str, transport: TransportConfig) -> redis.Redis:
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


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, like du -h)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))
