"""What every role process needs around its loop: logging, a device, a stop flag, weights lookup.

Roles are plain processes around a queue; these few helpers keep their entry points short and alike.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import redis

from protocol.errors import ProtocolError
from protocol.messages import WeightsAnnouncement, decode, encode
from protocol.names import Names
from protocol.reconnect import OUTAGES


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def resolve_device(name: str) -> str:
    """`auto` means CUDA when present, else CPU; nothing else in the code base picks a device."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: Any) -> Any:
    """A torch dtype from itself or its name ("bfloat16"), so configs can stay plain strings."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype: {dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16')")
    return resolved


class StopFlag:
    """Set by SIGINT/SIGTERM (or by hand); loops poll it at their natural boundaries."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install_signal_handlers(self) -> StopFlag:
        def handler(signum: int, frame: FrameType | None) -> None:
            logging.getLogger(__name__).info("signal %d: stopping at the next boundary", signum)
            self._event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        OUTAGES.should_stop = self.is_set  # a role told to stop during a Redis outage stops waiting for Redis
        return self

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


def announce_weights(client: redis.Redis, names: Names, announcement: WeightsAnnouncement) -> None:
    """Publish the latest version (a key actors poll) and log it (a short stream, for audit)."""
    blob = encode(announcement)
    pipe = client.pipeline(transaction=True)
    pipe.set(names.weights_latest, blob)
    pipe.xadd(names.weights, {b"m": blob}, maxlen=100, approximate=True)
    pipe.execute()


def latest_weights(client: redis.Redis, names: Names) -> WeightsAnnouncement | None:
    blob = client.get(names.weights_latest)
    if blob is None:
        return None
    try:
        message = decode(blob, expect=WeightsAnnouncement)
    except ProtocolError as exc:
        logging.getLogger(__name__).error("ignoring a malformed weights announcement: %s", exc)
        return None
    assert isinstance(message, WeightsAnnouncement)
    return message


def control_flag(client: redis.Redis, names: Names, flag: str) -> bool:
    return client.hget(names.control, flag) == b"1"


def wait_for_redis(client: redis.Redis, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"Redis not reachable after {timeout_s:.0f}s: {exc}") from None
            time.sleep(0.2)


def register_endpoint(client: redis.Redis, names: Names, role_id: str, url: str) -> None:
    """Where a role's /metrics lives, so the launcher and `opd top` can find every replica."""
    client.hset(names.key("endpoints"), role_id, url)


def endpoints(client: redis.Redis, names: Names) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(names.key("endpoints")).items()}
