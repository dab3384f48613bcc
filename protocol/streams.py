"""Redis Streams transport: consumer groups, ack after durable work, reclaim, dead letters, back-pressure.

Rules this module enforces, and why:
- Work is acknowledged (`XACK`) only after it is durably done, and in the same atomic script as its
  forwarding (`XADD` to the next stream), so a crash never loses or duplicates a hop.
- A consumer settles (forwards, acks, dead-letters) only entries it still owns: the script checks
  that each entry is still pending for this consumer (`XPENDING ... consumer`) before touching it. A
  slow but live consumer whose entries were reclaimed by another after `claim_idle_ms` is refused
  (`Settled.refused`), so the two never both forward one entry. The same check makes a settle retried
  after a lost reply harmless: the entry is no longer pending, and the retry is refused.
- A publish that records a ledger outcome is skipped when the ledger already knows the id, so a
  publish retried after a lost reply (see protocol/reconnect.py) does not add a second copy.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import redis

from protocol import admission
from protocol import ledger as ledger_mod
from protocol.codec import MAX_MESSAGE_BYTES
from protocol.config import TransportConfig
from protocol.errors import ProtocolError
from protocol.messages import Message, decode, encode, peek_id
from protocol.names import Names
from protocol.reconnect import ReconnectPolicy, RideOutRetry, redact_url, server_name

log = logging.getLogger(__name__)

PAYLOAD = b"m"
M = TypeVar("M", bound=Message)  # the message type a queue reads (its `expect`), carried by its deliveries
_SETTLED = (ledger_mod.TRAINED.encode(), ledger_mod.DROPPED.encode())


class BackpressureTimeout(TimeoutError):
    """The downstream backlog stayed above its high-water mark for longer than allowed."""


# Settle the entries this consumer still owns, atomically (see the module docstring). Per entry, if it
# is still pending for ARGV[2]: append its output (if it has fields) to KEYS[2], record its ledger
# outcome (if any), XACK and XDEL it; otherwise touch nothing. ARGV[3] (if not empty) names a counter
# (KEYS[6]) incremented by the number settled.
# KEYS: source stream, target stream, ledger, outcomes, holders, counter.
# ARGV: group, consumer, count?, then per entry: entry id, message id, outcome, n fields, n field/value pairs.
# Returns per entry: the output entry id, 1 (settled, no output) or 0 (refused: not this consumer's).
_SETTLE = ledger_mod.LUA_RECORD + """
local stream, target = KEYS[1], KEYS[2]
local lk = {KEYS[3], KEYS[4], KEYS[5]}
local group, consumer = ARGV[1], ARGV[2]
local out, settled, i = {}, 0, 4
while i <= #ARGV do
  local id, mid, outcome, nf = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local fields = {}
  for j = 1, 2 * nf do fields[j] = ARGV[i + 3 + j] end
  i = i + 4 + 2 * nf
  if #redis.call('XPENDING', stream, group, id, id, 1, consumer) == 0 then
    out[#out + 1] = 0
  else
    local res = 1
    if nf > 0 then res = redis.call('XADD', target, '*', unpack(fields)) end
    if outcome ~= '' and mid ~= '' then ledger_record(lk, mid, outcome) end
    redis.call('XACK', stream, group, id)
    redis.call('XDEL', stream, id)
    settled = settled + 1
    out[#out + 1] = res
  end
end
if ARGV[3] ~= '' and settled > 0 then redis.call('INCRBY', KEYS[6], settled) end
return out
"""

# Publish each message unless the ledger already knows its id. With a producer (ARGV[3] not empty), the entries
# it added are counted in its field of the produced-by hash (KEYS[5]) and spent from its admission lease
# (KEYS[6], protocol/admission.py), in the same step as the ledger's record, so no crash can separate them.
# KEYS: stream, ledger, outcomes, holders, produced-by, admission leases.
# ARGV: payload field, outcome, producer id or '', then per message: its id, its blob.
# Returns per message the entry id, or 0 when skipped.
_PUBLISH_ONCE = ledger_mod.LUA_RECORD + admission.LUA_SPEND + """
local out, added = {}, 0
for i = 4, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 then out[#out + 1] = 0 else
    out[#out + 1] = redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[i + 1])
    ledger_record({KEYS[2], KEYS[3], KEYS[4]}, ARGV[i], ARGV[2])
    added = added + 1
  end
end
if ARGV[3] ~= '' and added > 0 then
  redis.call('HINCRBY', KEYS[5], ARGV[3], added)
  admission_spend(KEYS[6], ARGV[3], added)
end
return out
"""


@dataclass
class Settle:
    """One entry to settle: its optional output (fields for the target stream) and ledger outcome."""

    entry_id: str
    message_id: str = ""
    outcome: str = ""
    fields: dict[str, Any] | None = None


@dataclass
class Settled:
    """What a fenced settle did: `done` entries were settled (`outputs`: their new entry ids downstream,
    in the same order, when forwarded); `refused` ones were no longer this consumer's and were left alone."""

    done: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


@dataclass
class Delivery(Generic[M]):
    """One read entry: its stream entry id, the decoded message, and how many times it has been delivered.

    Generic in the message type so that a consumer knows what it holds: a `StreamQueue[ScoredPrefix]`
    (one that reads with `expect=ScoredPrefix`) yields `Delivery[ScoredPrefix]`, and the type checker
    needs no ignore comment to read `d.message.policy_version`."""

    entry_id: str
    message: M
    deliveries: int


@dataclass
class DeadLetter:
    entry_id: str
    stream: str
    reason: str
    message_id: str | None
    payload: bytes


def connect(url: str, *, reconnect: ReconnectPolicy | None = None) -> redis.Redis:
    """A client from a URL (`redis://:password@host:port/db`); the password travels in the URL.

    Without `reconnect` a call fails soon when Redis is unreachable (one-shot commands: `opd top --once`,
    `opd cache stats`); with it every call rides out an outage (see `connect_role`).
    """
    kwargs: dict[str, Any] = {"socket_timeout": 30, "socket_connect_timeout": 10, "health_check_interval": 15}
    if reconnect is not None:
        kwargs["retry"] = RideOutRetry(reconnect, server_name(url), url=redact_url(url))
    return redis.Redis.from_url(url, **kwargs)


def connect_role(transport: TransportConfig) -> redis.Redis:
    """The client of a long-running process (every role, the launcher, `opd top`'s live view): each call
    waits for an unreachable Redis with bounded back-off (`transport.reconnect_*`, protocol/reconnect.py).

    One PING first: a wrong or missing password fails here (`RedisAuthFailed`, one line), before a role
    spends time loading its models; an unreachable Redis is waited for, as by any later call."""
    if not transport.redis_url:
        raise ValueError("transport.redis_url is not set")
    client = connect(transport.redis_url, reconnect=ReconnectPolicy.from_transport(transport))
    client.ping()
    return client


class StreamQueue(Generic[M]):
    """One stream seen by one consumer (or producer) of one group.

    Generic in what it reads: with `expect=ScoredPrefix` it is a `StreamQueue[ScoredPrefix]` and `read`
    returns `Delivery[ScoredPrefix]` (any other kind is dead-lettered on read). Without `expect` it reads
    any `Message`; annotate such a queue `StreamQueue[Message]` (a producer's queue reads nothing)."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        *,
        names: Names,
        group: str | None = None,
        consumer: str = "consumer",
        expect: type[M] | None = None,
        max_deliveries: int = 3,
        claim_idle_ms: int = 60_000,
        high_water: int = 10_000,
        max_bytes: int = MAX_MESSAGE_BYTES,
        on_dead_letter: Callable[[DeadLetter], None] | None = None,
        vocab_size: int | None = None,
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
        self.vocab_size = vocab_size  # the reading model's: token ids past it are dead-lettered (messages.check_vocab)
        self._group_ready = False
        self._next_reclaim = 0.0

    # -- producer side -------------------------------------------------------------------------
    def wait_for_room(self, *, timeout_s: float, should_stop: Callable[[], bool] = lambda: False, need: int = 1) -> float:
        """Block until `need` more entries fit under the high-water mark (at most the mark); returns seconds waited."""
        start = time.monotonic()
        delay = 0.01
        while self.depth() + min(need, self.high_water) > self.high_water:
            if should_stop():
                break
            if time.monotonic() - start > timeout_s:
                raise BackpressureTimeout(
                    f"{self.stream}: backlog stayed >= {self.high_water} for {timeout_s:.0f}s (are its consumers running?)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        return time.monotonic() - start

    def publish(self, message: Message, *, ledger_outcome: str | None = None, producer: str = "") -> str | None:
        """Append a message (validated on encode); optionally record it in the ledger in the same transaction
        (and, with `producer`, count it as `publish_many` does)."""
        blob = encode(message, max_bytes=self.max_bytes)
        return self.publish_raw(blob, ledger=(message.id, ledger_outcome) if ledger_outcome else None, producer=producer)

    def publish_many(self, messages: list[Message], *, ledger_outcome: str, producer: str = "") -> list[str | None]:
        """`publish` of a batch in one round trip (one script), all encoded first: a round trip per message capped a
        producer at ~0.1x of Redis's pipelined XADD rate. An id the ledger already knows is skipped (None).

        `producer` (an actor's id): the entries added are counted in its field of `names.produced_by` and spent
        from its admission lease, in the same script (see `_PUBLISH_ONCE`).
        """
        blobs = [encode(m, max_bytes=self.max_bytes) for m in messages]
        return self._publish_once([(m.id, b) for m, b in zip(messages, blobs, strict=True)], ledger_outcome,
                                  producer=producer)

    def publish_raw(self, blob: bytes, *, ledger: tuple[str, str] | None = None, producer: str = "") -> str | None:
        """Append raw bytes; with `ledger=(id, outcome)` only if the ledger does not know `id` yet (and then
        counted for `producer`, if given, as `publish_many` does).

        Returns the new entry id, or None when the id was already published (a retried publish whose
        first attempt went through before the connection dropped).
        """
        if ledger is None:
            return _s(self.client.xadd(self.stream, {PAYLOAD: blob}))
        return self._publish_once([(ledger[0], blob)], ledger[1], producer=producer)[0]

    def _publish_once(self, items: list[tuple[str, bytes]], outcome: str, *, producer: str = "") -> list[str | None]:
        args = [x for mid, blob in items for x in (mid, blob)]
        keys = [self.stream, *ledger_mod.keys(self.names), self.names.produced_by, self.names.admission_leases]
        results = self.client.eval(_PUBLISH_ONCE, len(keys), *keys, PAYLOAD, outcome, producer, *args)
        if skipped := [mid for (mid, _b), r in zip(items, results, strict=True) if r == 0]:
            log.info("%s: %s already in the ledger: not published again", self.stream, skipped[:4])
        return [None if r == 0 else _s(r) for r in results]

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

    def read(self, count: int, *, block_ms: int = 1000) -> list[Delivery[M]]:
        """Up to `count` valid deliveries: reclaimed ones first, then new ones. Bad ones are dead-lettered here."""
        self.ensure_group()
        try:
            return self._read(count, block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis came back without the stream (restarted without persistence, or flushed): recreate
            # the group; the caller reads again.
            log.warning("%s: consumer group %s is gone (Redis lost its data?): recreating it", self.stream, self.group)
            self._group_ready = False
            self.ensure_group()
            return []

    def _read(self, count: int, block_ms: int) -> list[Delivery[M]]:
        out: list[Delivery[M]] = []
        now = time.monotonic()
        if now >= self._next_reclaim:
            # A dead consumer's entries are only claimable after claim_idle_ms, so looking a few times
            # per idle period is enough; every read would double the Redis round trips of a busy consumer.
            out = self._reclaim(count)
            self._next_reclaim = now if out else now + min(self.claim_idle_ms / 4000, 5.0)
        if len(out) < count:
            resp = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count - len(out),
                                          block=block_ms if not out else None)
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    delivery = self._decode(_s(entry_id), fields, deliveries=1)
                    if delivery is not None:
                        out.append(delivery)
        return out

    def _reclaim(self, count: int) -> list[Delivery[M]]:
        """Take over messages a dead (or stalled) consumer left pending for longer than `claim_idle_ms`."""
        resp = self.client.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=count
        )
        claimed = resp[1] if resp else []
        deleted = resp[2] if resp and len(resp) > 2 else []
        if deleted:  # pending entries whose data was deleted: nothing to redo, just clear them
            self.client.xack(self.stream, self.group, *deleted)
        out: list[Delivery[M]] = []
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

    def _decode(self, entry_id: str, fields: dict[bytes, bytes], *, deliveries: int) -> Delivery[M] | None:
        blob = fields.get(PAYLOAD)
        if blob is None:
            self._dead_letter(entry_id, b"", f"entry has no {PAYLOAD.decode()!r} field (fields: {sorted(map(_s, fields))})")
            return None
        try:
            decoded = decode(blob, max_bytes=self.max_bytes, expect=self.expect, vocab_size=self.vocab_size)
        except ProtocolError as exc:
            self._dead_letter(entry_id, blob, f"malformed: {exc}")
            return None
        # decode refused any kind but `expect`; a queue without one reads every Message (its M)
        return Delivery(entry_id=entry_id, message=cast(M, decoded), deliveries=deliveries)

    def settle(self, items: list[Settle], *, target: str | None = None, count_as: str | None = None) -> Settled:
        """Settle the entries this consumer still owns, in one atomic script; refuse the others.

        Each owned entry gets its output appended to `target` (if it has fields), its ledger outcome
        recorded (if any), and is acknowledged and deleted. An entry no longer pending for this consumer
        (another one reclaimed it after `claim_idle_ms`, or it was settled already) is left untouched and
        listed in `Settled.refused`: its current owner settles it. `count_as` names a counter key
        incremented by the number settled (the learner's refused duplicates, its drops).
        """
        out = Settled()
        if not items:
            return out
        args: list[Any] = [self.group, self.consumer, "1" if count_as else ""]
        for it in items:
            pairs = [x for kv in (it.fields or {}).items() for x in kv]
            args += [it.entry_id, it.message_id, it.outcome, len(pairs) // 2, *pairs]
        keys = [self.stream, target or self.stream, *ledger_mod.keys(self.names), count_as or self.stream]
        results = self.client.eval(_SETTLE, len(keys), *keys, *args)
        for it, res in zip(items, results, strict=True):
            if res == 0:
                out.refused.append(it.entry_id)
                continue
            out.done.append(it.entry_id)
            if it.fields:
                out.outputs.append(_s(res))
        if out.refused:
            log.warning("%s: %s no longer owns %d of %d entries (taken over after claim_idle_ms=%d, or already "
                        "settled): left them to their owner", self.stream, self.consumer, len(out.refused),
                        len(items), self.claim_idle_ms)
        return out

    def ack(self, entry_ids: list[str], *, ledger: dict[str, str] | None = None, count_as: str | None = None) -> Settled:
        """Acknowledge and delete finished entries this consumer still owns (fenced, see `settle`).

        `ledger`: message id -> outcome, one per entry and in the same order as `entry_ids`; an outcome is
        recorded only with its entry, so a refused entry's outcome is left to its owner. `count_as`: a counter
        key incremented by the number acknowledged (as `settle`).
        """
        outcomes = list((ledger or {}).items())
        if outcomes and len(outcomes) != len(entry_ids):
            raise ValueError(f"ack: {len(outcomes)} ledger outcomes for {len(entry_ids)} entries (one per entry)")
        items = [Settle(e, *(outcomes[i] if outcomes else ("", ""))) for i, e in enumerate(entry_ids)]
        return self.settle(items, count_as=count_as)

    def forward(self, done: Sequence[tuple[Delivery[M], Message]], downstream: StreamQueue[Any]) -> Settled:
        """Publish results downstream and acknowledge their inputs, for the inputs this consumer still owns.

        Per input, atomically: both happen or neither, so a crash can neither lose the work nor forward it
        twice; and an input another consumer has reclaimed meanwhile is refused (`Settled.refused`), not
        forwarded a second time. A result that does not encode raises before anything is sent.
        """
        blobs = [encode(result, max_bytes=downstream.max_bytes) for _d, result in done]
        items = [Settle(d.entry_id, fields={PAYLOAD: blob}) for (d, _r), blob in zip(done, blobs, strict=True)]
        return self.settle(items, target=downstream.stream)

    def dead_letter(self, delivery: Delivery[M], reason: str) -> bool:
        """Give up on a decoded message (e.g. it made the scorer fail): park it with its reason.

        False when the entry is no longer this consumer's (fenced like every settle): nothing was done.
        """
        return self._dead_letter(delivery.entry_id, encode(delivery.message, max_bytes=self.max_bytes), reason,
                          message_id=delivery.message.id if hasattr(delivery.message, "id") else None)

    def _dead_letter(self, entry_id: str, blob: bytes, reason: str, *, message_id: str | None = None) -> bool:
        peeked = message_id is None
        message_id = message_id or peek_id(blob)
        fields: dict[str, Any] = {
            "m": blob, "stream": self.stream, "entry": entry_id, "reason": reason[:2000],
            "id": message_id or "", "consumer": self.consumer, "at": f"{time.time():.3f}",
        }
        outcome = ledger_mod.DEAD if message_id else ""
        if peeked and message_id and self.client.hget(self.names.ledger, message_id) in _SETTLED:
            outcome = ""  # an undecodable copy of an id already trained or dropped: the id keeps its one outcome
        item = Settle(entry_id, message_id or "", outcome, fields)
        if not self.settle([item], target=self.names.dead).done:
            return False  # another consumer owns it now: its fate is theirs to decide
        log.error("%s: dead-lettered %s: %s", self.stream, entry_id, reason)
        if self.on_dead_letter is not None:
            self.on_dead_letter(DeadLetter(entry_id, self.stream, reason, message_id, blob))
        return True

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
