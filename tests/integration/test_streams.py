"""Redis Streams transport, ledger and weights announcement against a real redis-server.

Behaviours pinned here (`protocol.streams`, `protocol.ledger`, `protocol.runtime`):
- publish/read/ack round trip: messages arrive decoded, in order, with deliveries == 1, also when they
  were published before the group existed; acked entries are deleted, so XLEN and pending drop to 0
  and nothing is delivered again;
- two consumers of one group split the work without duplication;
- malformed entries (raw non-msgpack bytes, an entry without the 'm' field, a decodable map with a bad
  field, the wrong kind for the stream) go to the dead-letter stream with the original bytes, the
  source stream and a reason naming the bad field; the ledger marks the id dead when the entry has
  one; the callback sees each; they leave neither backlog nor pending entries; good messages around
  them are still delivered;
- reclaim: a message a dead consumer left pending is not taken before `claim_idle_ms`, then is
  re-delivered to another consumer with deliveries == 2; past `max_deliveries` it is dead-lettered
  with a "delivered N times" reason (and marked dead); a pending entry whose data was deleted is cleared;
- `dead_letter` of a decoded message parks it with the caller's reason;
- `forward` publishes results downstream and acks inputs in one transaction (downstream gets the
  results, upstream has no backlog nor pending); if a result fails to encode, nothing happens at all;
- back-pressure: `wait_for_room` returns at once below the high-water mark, blocks at or above it
  until a consumer acks, stops early on `should_stop`, and raises `BackpressureTimeout` naming the
  stream on timeout;
- ledger: produced -> trained moves the counts (produced back to 0), a repeated outcome is not
  counted twice, counts are conserved;
- runtime: `announce_weights`/`latest_weights` round trip (latest wins, the log keeps all), and a
  malformed or wrong-kind latest key is ignored with None.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import redis

from protocol import ledger
from protocol.codec import encode_array
from protocol.errors import ProtocolError
from protocol.messages import RolloutPrefix, ScoredPrefix, WeightsAnnouncement, encode
from protocol.names import Names
from protocol.runtime import announce_weights, latest_weights
from protocol.streams import (
    BackpressureTimeout,
    DeadLetter,
    Delivery,
    StreamQueue,
    connect,
    read_dead_letters,
)

pytestmark = pytest.mark.integration

NAMES = Names("t")


@pytest.fixture()
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = connect(redis_url)
    yield c
    c.close()


def rollout(i: int = 0, **changes: Any) -> RolloutPrefix:
    base: dict[str, Any] = dict(
        prompt_ids_P=np.array([1, 2, 3 + i], np.int32),
        response_ids_R=np.array([4, 5], np.int32),
        behaviour_logprobs_R=np.array([-0.5, -1.5], np.float32),
        prompt_index=i,
        horizon=4,
        max_new_tokens=8,
        finished=False,
        policy_version=0,
        actor_id="actor-0",
    )
    base.update(changes)
    return RolloutPrefix(**base)


def scored(r: RolloutPrefix, **changes: Any) -> ScoredPrefix:
    n = len(r.response_ids_R)
    scores: dict[str, Any] = dict(
        teacher_logprobs_R=np.full(n, -0.25, np.float32),
        topk_ids_RK=np.zeros((n, 2), np.int32),
        topk_logprobs_RK=np.full((n, 2), -1.0, np.float16),
        teacher_id="teacher",
    )
    scores.update(changes)
    return ScoredPrefix.from_rollout(r, **scores)


def queue(client: redis.Redis, stream: str | None = None, **kwargs: Any) -> StreamQueue:
    kwargs.setdefault("expect", RolloutPrefix)
    return StreamQueue(client, stream or NAMES.rollouts, names=NAMES, **kwargs)


def message_ids(deliveries: list[Delivery]) -> list[str]:
    return [d.message.id for d in deliveries]


# -- round trip ------------------------------------------------------------------------------------


def test_publish_read_ack_round_trip(client: redis.Redis) -> None:
    producer = queue(client)
    sent = [rollout(i) for i in range(3)]
    entry_ids = [producer.publish(m) for m in sent]  # before the group exists: the group starts at id 0
    assert producer.depth() == 3 == client.xlen(NAMES.rollouts)

    consumer = queue(client, consumer="c1")
    got = consumer.read(10, block_ms=50)
    assert [d.entry_id for d in got] == entry_ids
    assert message_ids(got) == [m.id for m in sent]
    assert all(d.deliveries == 1 for d in got)
    assert [d.message.prompt_ids_P.tolist() for d in got] == [m.prompt_ids_P.tolist() for m in sent]
    assert consumer.pending() == 3
    assert consumer.depth() == 3  # delivered but not acked: still backlog

    consumer.ack([d.entry_id for d in got])
    assert client.xlen(NAMES.rollouts) == 0  # acked entries are deleted
    assert consumer.pending() == 0
    assert consumer.read(10, block_ms=20) == []
    assert read_dead_letters(client, NAMES) == []


def test_group_splits_work_between_consumers(client: redis.Redis) -> None:
    producer = queue(client)
    sent = [producer.publish(rollout(i)) for i in range(10)]
    a, b = queue(client, consumer="a"), queue(client, consumer="b")
    got_a = a.read(4, block_ms=20)
    got_b = b.read(100, block_ms=20)
    assert len(got_a) == 4
    assert len(got_b) == 6
    ids_a, ids_b = {d.entry_id for d in got_a}, {d.entry_id for d in got_b}
    assert not ids_a & ids_b
    assert ids_a | ids_b == set(sent)
    assert a.read(10, block_ms=20) == [] and b.read(10, block_ms=20) == []
    a.ack(sorted(ids_a))
    assert a.depth() == 6
    b.ack(sorted(ids_b))
    assert a.depth() == 0 and a.pending() == 0


# -- dead letters ----------------------------------------------------------------------------------


def test_malformed_entries_are_dead_lettered_and_good_ones_still_delivered(client: redis.Redis) -> None:
    seen: list[DeadLetter] = []
    consumer = queue(client, consumer="c1", on_dead_letter=seen.append)
    producer = queue(client)

    garbage = b"\xc1 not msgpack"
    bad_entries = [client.xadd(NAMES.rollouts, {"m": garbage}).decode()]
    bad_entries.append(client.xadd(NAMES.rollouts, {"x": b"1"}).decode())  # no 'm' field
    bad = rollout(1)
    payload = msgpack.unpackb(encode(bad), raw=False)
    payload["horizon"] = 0  # decodes as msgpack, fails validation, has an id
    bad_blob = msgpack.packb(payload, use_bin_type=True)
    bad_entries.append(producer.publish_raw(bad_blob, ledger=(bad.id, ledger.PRODUCED)))
    wrong_kind = scored(rollout(2))
    bad_entries.append(producer.publish_raw(encode(wrong_kind)))  # a scored prefix on the rollouts stream
    good = rollout(3)
    producer.publish(good)

    got = consumer.read(10, block_ms=20)
    assert message_ids(got) == [good.id]

    dead = read_dead_letters(client, NAMES)
    assert [d.stream for d in dead] == [NAMES.rollouts] * 4
    assert [d.entry_id for d in seen] == bad_entries  # the callback sees each, in stream order
    assert all(d.stream == NAMES.rollouts for d in seen)
    by_payload = {d.payload: d for d in dead}

    raw = by_payload[garbage]
    assert "message" in raw.reason and "msgpack" in raw.reason
    assert raw.message_id is None

    no_field = by_payload[b""]
    assert "'m'" in no_field.reason and "'x'" in no_field.reason
    assert no_field.message_id is None

    invalid = by_payload[bad_blob]
    assert "horizon" in invalid.reason
    assert invalid.message_id == bad.id
    assert ledger.outcome_of(client, NAMES, bad.id) == ledger.DEAD

    kind = by_payload[encode(wrong_kind)]
    assert "kind" in kind.reason
    assert kind.message_id == wrong_kind.id
    assert ledger.outcome_of(client, NAMES, wrong_kind.id) == ledger.DEAD

    counts = ledger.counts(client, NAMES)
    assert counts[ledger.PRODUCED] == 0  # the produced one moved to dead, not counted twice
    assert counts[ledger.DEAD] == 2
    assert {d.reason for d in seen} == {d.reason for d in dead}

    # dead letters leave no backlog and no pending; the next good message is still delivered
    assert consumer.pending() == 1
    consumer.ack([got[0].entry_id])
    assert consumer.depth() == 0 and consumer.pending() == 0
    client.xadd(NAMES.rollouts, {"m": b"\x00\x01"})
    later = rollout(4)
    producer.publish(later)
    assert message_ids(consumer.read(10, block_ms=20)) == [later.id]
    assert len(read_dead_letters(client, NAMES)) == 5


def test_explicit_dead_letter_of_a_decoded_message(client: redis.Redis) -> None:
    producer, consumer = queue(client), queue(client, consumer="c1")
    m = rollout()
    producer.publish(m, ledger_outcome=ledger.PRODUCED)
    [delivery] = consumer.read(1, block_ms=20)
    consumer.dead_letter(delivery, "scorer failed: sequence too long")
    [dead] = read_dead_letters(client, NAMES)
    assert dead.reason == "scorer failed: sequence too long"
    assert dead.message_id == m.id
    assert dead.payload == encode(m)
    assert ledger.outcome_of(client, NAMES, m.id) == ledger.DEAD
    assert consumer.depth() == 0 and consumer.pending() == 0


# -- reclaim and delivery limit --------------------------------------------------------------------


def test_dead_consumer_work_is_reclaimed(client: redis.Redis) -> None:
    producer = queue(client)
    m = rollout()
    entry = producer.publish(m)
    a = queue(client, consumer="A", claim_idle_ms=200)
    [first] = a.read(1, block_ms=20)
    assert first.deliveries == 1
    # A "dies": it never acks. B does not steal work that is not idle long enough.
    b = queue(client, consumer="B", claim_idle_ms=200)
    assert b.read(1, block_ms=10) == []
    time.sleep(0.25)
    [again] = b.read(1, block_ms=10)
    assert again.entry_id == entry
    assert again.message.id == m.id
    assert again.deliveries == 2
    assert b.pending() == 1
    consumer_pending = client.xpending_range(NAMES.rollouts, b.group, min="-", max="+", count=10)
    assert [p["consumer"] for p in consumer_pending] == [b"B"]
    b.ack([again.entry_id])
    assert b.depth() == 0 and b.pending() == 0
    assert read_dead_letters(client, NAMES) == []


def test_poison_message_is_dead_lettered_after_max_deliveries(client: redis.Redis) -> None:
    producer = queue(client)
    m = rollout()
    producer.publish(m, ledger_outcome=ledger.PRODUCED)
    kwargs: dict[str, Any] = dict(claim_idle_ms=20, max_deliveries=2)
    [d1] = queue(client, consumer="A", **kwargs).read(1, block_ms=10)
    time.sleep(0.03)
    [d2] = queue(client, consumer="B", **kwargs).read(1, block_ms=10)
    assert (d1.deliveries, d2.deliveries) == (1, 2)
    time.sleep(0.03)
    c = queue(client, consumer="C", **kwargs)
    assert c.read(1, block_ms=10) == []
    [dead] = read_dead_letters(client, NAMES)
    assert "delivered 3 times" in dead.reason
    assert dead.message_id == m.id
    assert dead.payload == encode(m)
    assert ledger.outcome_of(client, NAMES, m.id) == ledger.DEAD
    assert ledger.counts(client, NAMES)[ledger.PRODUCED] == 0
    assert c.depth() == 0 and c.pending() == 0


def test_pending_entry_whose_data_was_deleted_is_cleared(client: redis.Redis) -> None:
    producer = queue(client)
    entry = producer.publish(rollout())
    a = queue(client, consumer="A", claim_idle_ms=20)
    a.read(1, block_ms=10)
    client.xdel(NAMES.rollouts, entry)  # e.g. an operator removed it by hand
    time.sleep(0.03)
    b = queue(client, consumer="B", claim_idle_ms=20)
    assert b.read(1, block_ms=10) == []
    assert b.pending() == 0
    assert read_dead_letters(client, NAMES) == []


# -- forward ---------------------------------------------------------------------------------------


def test_forward_publishes_downstream_and_acks_upstream(client: redis.Redis) -> None:
    actor = queue(client)
    sent = [rollout(i) for i in range(3)]
    for m in sent:
        actor.publish(m)
    teacher = queue(client, consumer="teacher-0")
    downstream = queue(client, NAMES.scored, expect=ScoredPrefix)
    got = teacher.read(10, block_ms=10)
    done = [(d, scored(d.message)) for d in got]
    result = teacher.forward(done, downstream)
    out_ids = result.outputs
    assert len(out_ids) == 3 and result.refused == [] and result.done == [d.entry_id for d in got]
    assert teacher.pending() == 0
    assert client.xlen(NAMES.rollouts) == 0
    assert client.xlen(NAMES.scored) == 3

    learner = queue(client, NAMES.scored, consumer="learner", expect=ScoredPrefix)
    results = learner.read(10, block_ms=10)
    assert [d.entry_id for d in results] == out_ids
    assert message_ids(results) == [m.id for m in sent]  # ids are stable across the hop
    assert all(isinstance(d.message, ScoredPrefix) for d in results)
    assert teacher.forward([], downstream).done == []


def test_forward_of_a_reclaimed_entry_is_refused(client: redis.Redis) -> None:
    """A slow teacher (A) whose entry was reclaimed by B after claim_idle_ms: A's forward is refused, B's
    goes through, and the scored stream holds exactly one copy."""
    actor = queue(client)
    m = rollout()
    actor.publish(m, ledger_outcome=ledger.PRODUCED)
    downstream = queue(client, NAMES.scored, expect=ScoredPrefix)
    a = queue(client, consumer="A", claim_idle_ms=100)
    b = queue(client, consumer="B", claim_idle_ms=100)
    [da] = a.read(1, block_ms=10)
    deadline = time.monotonic() + 30
    got_b: list[Delivery] = []
    while not got_b:  # B reclaims once A's entry is idle for claim_idle_ms (never sooner)
        assert time.monotonic() < deadline, "B never reclaimed A's idle entry"
        time.sleep(0.05)
        got_b = b.read(1, block_ms=10)
    [db] = got_b
    assert db.entry_id == da.entry_id and db.deliveries == 2

    refused = a.forward([(da, scored(da.message))], downstream)
    assert (refused.done, refused.outputs, refused.refused) == ([], [], [da.entry_id])
    assert client.xlen(NAMES.scored) == 0 and b.pending() == 1  # A touched nothing

    accepted = b.forward([(db, scored(db.message))], downstream)
    assert accepted.done == [db.entry_id] and len(accepted.outputs) == 1 and accepted.refused == []
    assert client.xlen(NAMES.scored) == 1 and b.pending() == 0 and client.xlen(NAMES.rollouts) == 0

    # A retried forward (its first attempt went through, the reply was lost) is refused too.
    again = b.forward([(db, scored(db.message))], downstream)
    assert again.refused == [db.entry_id] and client.xlen(NAMES.scored) == 1
    # And so are A's ack and dead letter of the entry it lost.
    assert a.ack([da.entry_id], ledger={m.id: ledger.DROPPED}).refused == [da.entry_id]
    assert a.dead_letter(da, "too late") is False
    assert ledger.outcome_of(client, NAMES, m.id) == ledger.PRODUCED and read_dead_letters(client, NAMES) == []


def test_forward_settles_owned_entries_and_refuses_only_the_lost_ones(client: redis.Redis) -> None:
    actor = queue(client)
    for i in range(3):
        actor.publish(rollout(i))
    downstream = queue(client, NAMES.scored, expect=ScoredPrefix)
    a = queue(client, consumer="A")
    got = a.read(3, block_ms=10)
    # B takes the middle entry over explicitly (what XAUTOCLAIM does after claim_idle_ms).
    client.xclaim(NAMES.rollouts, a.group, "B", 0, [got[1].entry_id])
    result = a.forward([(d, scored(d.message)) for d in got], downstream)
    assert result.done == [got[0].entry_id, got[2].entry_id] and result.refused == [got[1].entry_id]
    out = queue(client, NAMES.scored, consumer="L", expect=ScoredPrefix).read(10, block_ms=10)
    assert [d.entry_id for d in out] == result.outputs
    assert message_ids(out) == [got[0].message.id, got[2].message.id]


def test_publish_with_a_ledger_outcome_is_idempotent(client: redis.Redis) -> None:
    """A publish retried after a lost reply must not add a second copy (the ledger knows the id)."""
    producer = queue(client)
    m = rollout()
    first = producer.publish(m, ledger_outcome=ledger.PRODUCED)
    assert first is not None
    assert producer.publish(m, ledger_outcome=ledger.PRODUCED) is None
    assert client.xlen(NAMES.rollouts) == 1 and ledger.counts(client, NAMES)[ledger.PRODUCED] == 1
    assert producer.publish(m) is not None  # without a ledger outcome there is nothing to check against


def test_publish_many_is_one_round_trip_in_order_and_idempotent(client: redis.Redis) -> None:
    """An actor's batch goes out in one script call (bench/bench_queue.py: a call per message capped a producer
    at ~0.1x of Redis's pipelined XADD rate); a retried batch adds only the ids the ledger does not know."""
    producer = queue(client)
    sent = [rollout(i) for i in range(5)]
    client.config_resetstat()
    entries = producer.publish_many(sent[:3], ledger_outcome=ledger.PRODUCED)
    assert int(client.info("commandstats")["cmdstat_eval"]["calls"]) == 1
    assert all(entries) and [e for e, _f in client.xrange(NAMES.rollouts)] == [e.encode() for e in entries]
    again = producer.publish_many(sent, ledger_outcome=ledger.PRODUCED)  # the first 3 were published already
    assert again[:3] == [None] * 3 and all(again[3:])
    assert message_ids(queue(client, consumer="c").read(10, block_ms=100)) == [m.id for m in sent]
    assert ledger.counts(client, NAMES)[ledger.PRODUCED] == 5


def test_wait_for_room_with_need_waits_until_the_whole_chunk_fits(client: redis.Redis) -> None:
    producer = queue(client, high_water=3)
    producer.publish(rollout(0))
    producer.wait_for_room(timeout_s=0.2, need=2)  # 1 + 2 fit under 3
    with pytest.raises(BackpressureTimeout):
        producer.wait_for_room(timeout_s=0.2, need=3)  # 1 + 3 would not
    client.delete(NAMES.rollouts)
    producer.wait_for_room(timeout_s=0.2, need=10)  # more than the mark: waits for an empty stream, not forever


def test_forward_is_all_or_nothing_when_a_result_is_invalid(client: redis.Redis) -> None:
    actor = queue(client)
    for i in range(2):
        actor.publish(rollout(i))
    teacher = queue(client, consumer="teacher-0")
    downstream = queue(client, NAMES.scored, expect=ScoredPrefix)
    got = teacher.read(10, block_ms=10)
    done = [(got[0], scored(got[0].message)), (got[1], scored(got[1].message, teacher_logprobs_R=np.zeros(1, np.float32)))]
    with pytest.raises(ProtocolError) as info:
        teacher.forward(done, downstream)
    assert info.value.field == "teacher_logprobs_R"
    assert client.xlen(NAMES.scored) == 0
    assert teacher.pending() == 2
    assert teacher.depth() == 2


# -- back-pressure ---------------------------------------------------------------------------------


def test_wait_for_room_returns_at_once_below_high_water(client: redis.Redis) -> None:
    producer = queue(client, high_water=2)
    producer.publish(rollout())
    assert producer.wait_for_room(timeout_s=5) < 0.1


def test_wait_for_room_blocks_until_a_consumer_acks(client: redis.Redis) -> None:
    producer = queue(client, high_water=2)
    producer.publish(rollout(0))
    producer.publish(rollout(1))
    consumer = queue(client, consumer="c1")
    got = consumer.read(2, block_ms=10)
    assert len(got) == 2
    assert producer.depth() == 2  # delivered but not acked still counts

    def ack_later() -> None:
        time.sleep(0.3)
        consumer.ack([got[0].entry_id])

    thread = threading.Thread(target=ack_later)
    start = time.monotonic()
    thread.start()
    waited = producer.wait_for_room(timeout_s=5)
    elapsed = time.monotonic() - start
    thread.join()
    assert 0.28 <= waited <= elapsed < 2
    assert producer.depth() == 1


def test_wait_for_room_stops_early_on_should_stop(client: redis.Redis) -> None:
    producer = queue(client, high_water=1)
    producer.publish(rollout())
    assert producer.wait_for_room(timeout_s=5, should_stop=lambda: True) < 0.1


def test_wait_for_room_times_out_naming_the_stream(client: redis.Redis) -> None:
    producer = queue(client, high_water=1)
    producer.publish(rollout())
    start = time.monotonic()
    with pytest.raises(BackpressureTimeout) as info:
        producer.wait_for_room(timeout_s=0.2)
    assert 0.2 <= time.monotonic() - start < 2
    assert NAMES.rollouts in str(info.value)
    assert isinstance(info.value, TimeoutError)


# -- ledger ----------------------------------------------------------------------------------------


def test_ledger_moves_produced_to_trained_without_double_counting(client: redis.Redis) -> None:
    producer = queue(client, NAMES.scored, expect=ScoredPrefix)
    messages = [scored(rollout(i)) for i in range(3)]
    for m in messages:
        producer.publish(m, ledger_outcome=ledger.PRODUCED)
    counts = ledger.counts(client, NAMES)
    assert counts == {ledger.PRODUCED: 3, ledger.TRAINED: 0, ledger.DROPPED: 0, ledger.DEAD: 0}

    learner = queue(client, NAMES.scored, consumer="learner", expect=ScoredPrefix)
    got = learner.read(10, block_ms=10)
    learner.ack(
        [d.entry_id for d in got],
        ledger={got[0].message.id: ledger.TRAINED, got[1].message.id: ledger.TRAINED, got[2].message.id: ledger.DROPPED},
    )
    counts = ledger.counts(client, NAMES)
    assert counts[ledger.PRODUCED] == 0
    assert counts[ledger.TRAINED] == 2
    assert counts[ledger.DROPPED] == 1
    assert ledger.outcome_of(client, NAMES, messages[0].id) == ledger.TRAINED
    assert ledger.outcome_of(client, NAMES, "never-seen") is None

    # a repeated outcome (e.g. a retried ack) is not counted twice
    ledger.record(client, NAMES, {messages[0].id: ledger.TRAINED})
    ledger.record(client, NAMES, {messages[0].id: ledger.TRAINED, messages[1].id: ledger.TRAINED})
    counts = ledger.counts(client, NAMES)
    assert (counts[ledger.TRAINED], counts[ledger.DROPPED], counts[ledger.PRODUCED]) == (2, 1, 0)
    assert sum(counts.values()) == client.hlen(NAMES.ledger) == 3  # conservation: one outcome per id


# -- weights announcement --------------------------------------------------------------------------


def test_announce_and_latest_weights(client: redis.Redis) -> None:
    assert latest_weights(client, NAMES) is None
    first = WeightsAnnouncement(version=1, path="/w/v000001", step=10, nbytes=1000, created_at=1.0)
    second = WeightsAnnouncement(version=2, path="/w/v000002", step=20, nbytes=1000, created_at=2.0)
    announce_weights(client, NAMES, first)
    assert latest_weights(client, NAMES) == first
    announce_weights(client, NAMES, second)
    assert latest_weights(client, NAMES) == second
    assert client.xlen(NAMES.weights) == 2


@pytest.mark.parametrize(
    "blob",
    [
        b"garbage",
        encode(rollout()),  # decodable, wrong kind
        msgpack.packb({"kind": "weights", "v": 1, "version": -1, "path": "/w", "step": 0, "nbytes": 0, "created_at": 0.0}),
        msgpack.packb({"kind": "weights", "v": 1, "version": 1, "path": encode_array(np.zeros(1, np.int32))}),
    ],
)
def test_malformed_latest_weights_is_ignored(client: redis.Redis, blob: bytes) -> None:
    client.set(NAMES.weights_latest, blob)
    assert latest_weights(client, NAMES) is None
