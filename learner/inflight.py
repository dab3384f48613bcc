"""Entries the learner has read but not yet committed: kept claimed while held, taken back at once on restart.

Why this is needed: an entry stays pending (in the consumer group's PEL) from the moment it is read until
its step is committed (``learner/journal.py``) or it is dropped. ``XAUTOCLAIM`` hands an entry idle for
``transport.claim_idle_ms`` to whichever consumer asks, which is right for a dead consumer but wrong for a
live learner whose step (or prefetch buffer, or checkpoint) simply takes longer than that: its own
prefetch thread, or another rank, would take the entry again and train it twice. So the prefetch thread
re-claims everything it holds (``XCLAIM ... JUSTID``: idle time reset, delivery count unchanged) at a
quarter of ``claim_idle_ms``, before each read; only the prefetch thread runs ``XAUTOCLAIM`` in this
process, so its own held entries are never idle long enough for it to take them over.

Why a stable consumer name (``learner-<rank>``, not the process id): after a restart the learner finds
the entries its previous incarnation read and never committed under its own name, and re-reads them at
once (``XREADGROUP`` from id 0, which counts as a delivery, so a sample that keeps crashing the learner
is dead-lettered after ``transport.max_deliveries``), instead of waiting ``claim_idle_ms`` for
``XAUTOCLAIM``. Entries of a consumer that is gone for good (a rank of a larger earlier run) are still
reclaimed by ``XAUTOCLAIM`` after ``claim_idle_ms``.
"""

from __future__ import annotations

import logging
import threading
import time

from protocol.messages import ScoredPrefix
from protocol.streams import PAYLOAD, Delivery, StreamQueue

log = logging.getLogger(__name__)


def consumer_name(rank: int) -> str:
    """The learner's consumer name in the ``learners`` group: one per rank, the same after a restart."""
    return f"learner-{rank}"


class LearnerQueue(StreamQueue[ScoredPrefix]):
    """`StreamQueue` of scored prefixes plus what a consumer that holds entries for a long time needs."""

    def recover_own(self) -> list[Delivery[ScoredPrefix]]:
        """Re-deliver every entry pending under this consumer's name (left by a previous incarnation)."""
        self.ensure_group()
        out: list[Delivery[ScoredPrefix]] = []
        last = "0"
        while True:
            resp = self.client.xreadgroup(self.group, self.consumer, {self.stream: last}, count=256)
            entries = resp[0][1] if resp else []
            if not entries:
                return out
            first, final = _s(entries[0][0]), _s(entries[-1][0])
            counts = {_s(p["message_id"]): int(p["times_delivered"]) for p in self.client.xpending_range(
                self.stream, self.group, min=first, max=final, count=len(entries), consumername=self.consumer)}
            for entry_id, fields in entries:
                eid = _s(entry_id)
                last = eid
                if not fields:  # deleted while pending: nothing to redo
                    self.client.xack(self.stream, self.group, eid)
                    continue
                deliveries = counts.get(eid, 1)
                if deliveries > self.max_deliveries:
                    self._dead_letter(eid, fields.get(PAYLOAD, b""), f"delivered {deliveries} times without completing")
                    continue
                delivery = self._decode(eid, fields, deliveries=deliveries)
                if delivery is not None:
                    out.append(delivery)
            if out:
                log.warning("%s: took back %d entries this consumer (%s) read before a restart", self.stream,
                            len(out), self.consumer)

    def keep_claimed(self, entry_ids: list[str]) -> None:
        """Reset the idle time of held entries without counting a delivery (``XCLAIM JUSTID``)."""
        for i in range(0, len(entry_ids), 1000):
            self.client.xclaim(self.stream, self.group, self.consumer, 0, entry_ids[i:i + 1000], justid=True)


class InFlight:
    """The entry ids this process holds (read, not committed or dropped); thread-safe."""

    def __init__(self, queue: LearnerQueue) -> None:
        self.queue = queue
        # A quarter of the reclaim threshold: three missed refreshes still leave the entries ours.
        self.refresh_s = queue.claim_idle_ms / 4000.0
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._last_refresh = time.monotonic()

    def add(self, entry_ids: list[str]) -> None:
        with self._lock:
            self._ids.update(entry_ids)

    def discard(self, entry_ids: list[str]) -> None:
        with self._lock:
            self._ids.difference_update(entry_ids)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    def refresh_if_due(self) -> None:
        """Called by the prefetch thread before each read (the only place this process reclaims)."""
        if time.monotonic() - self._last_refresh < self.refresh_s:
            return
        with self._lock:
            ids = sorted(self._ids)
        if ids:
            self.queue.keep_claimed(ids)
        self._last_refresh = time.monotonic()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
