"""Redis Streams transport: consumer groups, ack after durable work, reclaim, dead letters, back-pressure.

Rules this module enforces, and why:
- Work is acknowledged (`XACK`) only after it is durably done, and in the same `MULTI` transaction
  as its forwarding (`XADD` to the next stream), so a crash never loses or duplicates a hop.
- Acknowledged entries are deleted (`XDEL`): `XLEN` is then exactly the backlog (undelivered plus
  pending), which is what back-pressure compares with the high-water mark. Unconsumed work is never
  trimmed (`MAXLEN` would silently drop it).
- A consumer that dies leaves its messages pending; `XAUTOCLAIM` hands them to a live consumer after
  `claim_idle_ms`. A message delivered more than `max_deliveries` times (a poison message that
  crashes its consumer) is dead-lettered with its reason instead of looping forever.
- A message that does not decode goes to the dead-letter stream at once, with the decoder's reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from protocol import ledger as ledger_mod
from protocol.codec import MAX_MESSAGE_BYTES
from protocol.errors import ProtocolError
from protocol.messages import Message, decode, encode, peek_id
from protocol.names import Names

log = logging.getLogger(__name__)

PAYLOAD = b"m"


class BackpressureTimeout(TimeoutError):
    """The downstream backlog stayed above its high-water mark for longer than allowed."""


@dataclass
class Delivery:
    entry_id: str
    message: Message
    deliveries: int


@dataclass
class DeadLetter:
    entry_id: str
    stream: str
    reason: str
    message_id: str | None
    payload: bytes


def connect(url: str) -> redis.Redis:
    """A client from a URL (`redis://:password@host:port/db`); the password travels in the URL."""
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=15)


class StreamQueue:
    """One stream seen by one consumer (or producer) of one group."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        *,
        names: Names,
        group: str | None = None,
        consumer: str = "consumer",
        expect: type[Message] | None = None,
        max_deliveries: int = 3,
        claim_idle_ms: int = 60_000,
        high_water: int = 10_000,
        max_bytes: int = MAX_MESSAGE_BYTES,
        on_dead_letter: Callable[[DeadLetter], None] | None = None,
    ) -> None:
        self.client = client
        self.stream = stream
        self.names = names
        self.group = group or names.groups.get(stream, "default")
        self.consumer = consumer
        self.expect = expect
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.high_water = high_water
        self.max_bytes = max_bytes
        self.on_dead_letter = on_dead_letter
        self._group_ready = False
        self._next_reclaim = 0.0

    # -- producer side -------------------------------------------------------------------------
    def wait_for_room(self, *, timeout_s: float, should_stop: Callable[[], bool] = lambda: False) -> float:
        """Block while the backlog is at or above the high-water mark; returns seconds waited."""
        start = time.monotonic()
        delay = 0.01
        while self.depth() >= self.high_water:
            if should_stop():
                break
            if time.monotonic() - start > timeout_s:
                raise BackpressureTimeout(
                    f"{self.stream}: backlog stayed >= {self.high_water} for {timeout_s:.0f}s (are its consumers running?)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        return time.monotonic() - start

    def publish(self, message: Message, *, ledger_outcome: str | None = None) -> str:
        """Append a message (validated on encode); optionally record it in the ledger in the same transaction."""
        blob = encode(message, max_bytes=self.max_bytes)
        return self.publish_raw(blob, ledger=(message.id, ledger_outcome) if ledger_outcome else None)

    def publish_raw(self, blob: bytes, *, ledger: tuple[str, str] | None = None) -> str:
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.stream, {PAYLOAD: blob})
        if ledger is not None:
            ledger_mod.record(pipe, self.names, {ledger[0]: ledger[1]})
        entry_id = pipe.execute()[0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    # -- consumer side -------------------------------------------------------------------------
    def ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def read(self, count: int, *, block_ms: int = 1000) -> list[Delivery]:
        """Up to `count` valid deliveries: reclaimed ones first, then new ones. Bad ones are dead-lettered here."""
        self.ensure_group()
        out: list[Delivery] = []
        now = time.monotonic()
        if now >= self._next_reclaim:
            # A dead consumer's entries are only claimable after claim_idle_ms, so looking a few times
            # per idle period is enough; every read would double the Redis round trips of a busy consumer.
            out = self._reclaim(count)
            self._next_reclaim = now if out else now + min(self.claim_idle_ms / 4000, 5.0)
        if len(out) < count:
            resp = self.client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count - len(out), block=block_ms if not out else None
            )
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    delivery = self._decode(_s(entry_id), fields, deliveries=1)
                    if delivery is not None:
                        out.append(delivery)
        return out

    def _reclaim(self, count: int) -> list[Delivery]:
        """Take over messages a dead consumer left pending for longer than `claim_idle_ms`."""
        resp = self.client.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=count
        )
        claimed = resp[1] if resp else []
        deleted = resp[2] if resp and len(resp) > 2 else []
        if deleted:  # pending entries whose data was deleted: nothing to redo, just clear them
            self.client.xack(self.stream, self.group, *deleted)
        out: list[Delivery] = []
        for entry_id, fields in claimed:
            if fields is None:
                continue
            eid = _s(entry_id)
            info = self.client.xpending_range(self.stream, self.group, min=eid, max=eid, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else self.max_deliveries + 1
            if deliveries > self.max_deliveries:
                self._dead_letter(eid, fields.get(PAYLOAD, b""), f"delivered {deliveries} times without completing")
                continue
            delivery = self._decode(eid, fields, deliveries=deliveries)
            if delivery is not None:
                log.warning("%s: reclaimed %s (delivery %d)", self.stream, eid, deliveries)
                out.append(delivery)
        return out

    def _decode(self, entry_id: str, fields: dict[bytes, bytes], *, deliveries: int) -> Delivery | None:
        blob = fields.get(PAYLOAD)
        if blob is None:
            self._dead_letter(entry_id, b"", f"entry has no {PAYLOAD.decode()!r} field (fields: {sorted(map(_s, fields))})")
            return None
        try:
            message = decode(blob, max_bytes=self.max_bytes, expect=self.expect)
        except ProtocolError as exc:
            self._dead_letter(entry_id, blob, f"malformed: {exc}")
            return None
        return Delivery(entry_id=entry_id, message=message, deliveries=deliveries)

    def ack(self, entry_ids: list[str], *, ledger: dict[str, str] | None = None) -> None:
        """Acknowledge and delete finished entries (and record their outcomes) in one transaction."""
        if not entry_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *entry_ids)
        pipe.xdel(self.stream, *entry_ids)
        if ledger:
            ledger_mod.record(pipe, self.names, ledger)
        pipe.execute()

    def forward(self, done: list[tuple[Delivery, Message]], downstream: StreamQueue) -> list[str]:
        """Publish results downstream and acknowledge their inputs atomically (`MULTI`/`EXEC`).

        Either both happen or neither: a crash in between can neither lose the work nor forward it twice.
        """
        if not done:
            return []
        blobs = [encode(result, max_bytes=downstream.max_bytes) for _d, result in done]
        pipe = self.client.pipeline(transaction=True)
        for blob in blobs:
            pipe.xadd(downstream.stream, {PAYLOAD: blob})
        ids = [d.entry_id for d, _r in done]
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        results = pipe.execute()
        return [_s(r) for r in results[: len(blobs)]]

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Give up on a decoded message (e.g. it made the scorer fail): park it with its reason."""
        self._dead_letter(delivery.entry_id, encode(delivery.message, max_bytes=self.max_bytes), reason,
                          message_id=delivery.message.id if hasattr(delivery.message, "id") else None)

    def _dead_letter(self, entry_id: str, blob: bytes, reason: str, *, message_id: str | None = None) -> None:
        message_id = message_id or peek_id(blob)
        fields: dict[str, Any] = {
            "m": blob, "stream": self.stream, "entry": entry_id, "reason": reason[:2000],
            "id": message_id or "", "consumer": self.consumer, "at": f"{time.time():.3f}",
        }
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.names.dead, fields)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.xdel(self.stream, entry_id)
        if message_id:
            ledger_mod.record(pipe, self.names, {message_id: ledger_mod.DEAD})
        pipe.execute()
        log.error("%s: dead-lettered %s: %s", self.stream, entry_id, reason)
        if self.on_dead_letter is not None:
            self.on_dead_letter(DeadLetter(entry_id, self.stream, reason, message_id, blob))

    def depth(self) -> int:
        return int(self.client.xlen(self.stream))

    def pending(self) -> int:
        self.ensure_group()
        info = self.client.xpending(self.stream, self.group)
        return int(info["pending"]) if info else 0


def read_dead_letters(client: redis.Redis, names: Names, count: int = 1000) -> list[DeadLetter]:
    """The dead-letter stream, oldest first, for operators and tests."""
    out = []
    for entry_id, fields in client.xrange(names.dead, count=count):
        out.append(
            DeadLetter(
                entry_id=_s(entry_id), stream=_s(fields.get(b"stream", b"")), reason=_s(fields.get(b"reason", b"")),
                message_id=_s(fields.get(b"id", b"")) or None, payload=fields.get(b"m", b""),
            )
        )
    return out


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
