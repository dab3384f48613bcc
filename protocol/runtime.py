"""What every role process needs around its loop: logging, a device, a stop flag, weights lookup.

Roles are plain processes around a queue; these few helpers keep their entry points short and alike.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis

from protocol.errors import ProtocolError
from protocol.messages import WeightsAnnouncement, decode, encode
from protocol.names import Names
from protocol.reconnect import OUTAGES

if TYPE_CHECKING:
    from protocol.streams import StreamQueue

log = logging.getLogger(__name__)


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
    """Set by SIGINT/SIGTERM (or by hand); loops poll it at their natural boundaries.

    What a role does when it is set: it takes no new work, finishes the unit in hand (what it finished is
    acknowledged or forwarded) and exits 0. With a bound (`transport.stop_timeout_s`) a signal also starts
    a watchdog: a drain that takes longer exits anyway, after logging what it leaves; a second signal exits
    at once. Why exiting unfinished is safe: an unfinished unit is what a SIGKILL leaves, which the pipeline
    survives: entries a consumer read stay pending in its group (reclaimed by another consumer after
    `transport.claim_idle_ms`, or by the same one at restart), a generation never published was never
    recorded, and checkpoints and cache shards are written atomically.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._signals = 0
        self._bound_s: float | None = None
        self._on_abandon: list[Callable[[], str]] = []

    def install_signal_handlers(self, bound_s: float | None = None) -> StopFlag:
        """Stop on SIGTERM/SIGINT; with `bound_s`, exit at the latest that long after the first signal."""
        self._bound_s = bound_s
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        OUTAGES.should_stop = self.is_set  # a role told to stop during a Redis outage stops waiting for Redis
        return self

    def on_abandon(self, hook: Callable[[], str]) -> None:
        """`hook` says (and may release) what the role holds unfinished; called only on a forced exit."""
        self._on_abandon.append(hook)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            self.exit_now(f"a second {name}")
            return
        bound = f"; exiting within {self._bound_s:g}s (transport.stop_timeout_s)" if self._bound_s else ""
        log.info("%s: stopping: no new work, finishing the unit in hand%s", name, bound)
        self._event.set()
        if self._bound_s is not None:
            threading.Thread(target=self._watchdog, args=(self._bound_s,), name="stop-watchdog", daemon=True).start()

    def _watchdog(self, bound_s: float) -> None:
        time.sleep(bound_s)
        self.exit_now(f"the drain took longer than transport.stop_timeout_s={bound_s:g}s")

    def exit_now(self, why: str) -> None:
        """Exit the process at once (code 0), after logging what is left and why that is not lost (class doc)."""
        left = _abandoned(self._on_abandon, timeout_s=5.0)
        log.warning("%s: exiting without finishing the drain; left for another consumer or a restart: %s", why,
                    left or "nothing held")
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        os._exit(0)

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


def _abandoned(hooks: list[Callable[[], str]], timeout_s: float) -> str:
    """The hooks' reports, run in a thread of their own: a hook stuck on Redis must not hold up the exit."""
    reports: list[str] = []

    def run() -> None:
        for hook in hooks:
            try:
                reports.append(hook())
            except Exception as exc:  # the exit goes ahead whatever a report costs
                reports.append(f"(could not tell: {type(exc).__name__}: {exc})")

    worker = threading.Thread(target=run, name="stop-report", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return "; ".join(r for r in reports if r) + ("" if not worker.is_alive() else " (report cut short)")


def held_entries(queue: StreamQueue) -> str:
    """How many entries the queue's consumer holds unacknowledged (what another consumer, or it after a restart,
    will reclaim)."""
    summary = queue.client.xpending(queue.stream, queue.group)
    held = sum(int(c["pending"]) for c in summary.get("consumers") or []
               if (c["name"].decode() if isinstance(c["name"], bytes) else c["name"]) == queue.consumer)
    return f"{held} entries of {queue.stream} pending for {queue.consumer}"


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


def register_endpoint(client: redis.Redis, names: Names, role_id: str, url: str) -> None:
    """Where a role's /metrics lives, so the launcher and `opd top` can find every replica."""
    client.hset(names.key("endpoints"), role_id, url)


def endpoints(client: redis.Redis, names: Names) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(names.key("endpoints")).items()}
