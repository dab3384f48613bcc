"""Producer-side staleness control (actors/admission.py, protocol/admission.py) against a real Redis.

Pins: no work is admitted before a learner publishes its state, nor while the state there is malformed
(the reason is kept, not raised); at most
(max_staleness + 1) x batch_size + retired prefixes are ever published or reserved, also when actors race
for the last slots; slots come back as the learner retires work (trained, dropped or dead) as of its last
published version; stopping while waiting admits nothing; released slots are reusable. Slots are per-actor
leases (issue 16, defect 2): a lease whose heartbeat stops expires and its slots come back, a heartbeat keeps a
slow actor's lease, publishing spends the lease (and counts the producer) in the publish script, and an actor
whose publish times out on back-pressure gives its slots back.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from actors.actor import Actor
from actors.admission import Admission, Heartbeat
from actors.config import ActorConfig
from opd.tiny import asset_paths
from protocol import admission, ledger
from protocol.config import TransportConfig
from protocol.messages import RolloutPrefix
from protocol.names import Names
from protocol.runtime import StopFlag
from protocol.state import LearnerState, StateUnavailable, publish_state
from protocol.streams import BackpressureTimeout, StreamQueue

pytestmark = pytest.mark.integration


def _advertise(client: redis.Redis, names: Names, *, version: int, retired: int, batch: int = 4, staleness: int = 1) -> None:
    publish_state(client, names, LearnerState(version=version, step=version, batch_size=batch, max_staleness=staleness,
                                              retired=retired))


def _stop_soon(seconds: float = 0.3) -> StopFlag:
    stop = StopFlag()
    threading.Timer(seconds, stop.set).start()
    return stop


def _held(client: redis.Redis, names: Names) -> int:
    return sum(admission.leases(client, names).values())


def _rollout(i: int) -> RolloutPrefix:
    return RolloutPrefix(prompt_ids_P=np.array([1, 2, 3 + i], np.int32), response_ids_R=np.array([4, 5], np.int32),
                         behaviour_logprobs_R=np.array([-0.5, -1.5], np.float32), prompt_index=i, horizon=4,
                         max_new_tokens=8, finished=False, policy_version=0, actor_id="actor-a")


def test_nothing_is_admitted_before_a_learner_advertises(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("adm0")
    assert Admission(client, names, "a").acquire(4, _stop_soon(), lambda: False) == 0
    assert admission.leases(client, names) == {}


def test_a_malformed_state_admits_nothing_and_says_why(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("adm3")
    client.set(names.learner_state, b"\x81\xa4kind\xa7weights")  # valid msgpack, not a learner state
    adm = Admission(client, names, "a")
    assert adm.acquire(4, _stop_soon(), lambda: False) == 0
    assert admission.leases(client, names) == {}
    assert isinstance(adm.state, StateUnavailable) and adm.state.malformed and "kind" in adm.state.reason
    _advertise(client, names, version=0, retired=0)  # a valid state replaces it: admission resumes
    assert adm.acquire(4, StopFlag(), lambda: False) == 4


def test_bound_and_refill(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("adm1")
    adm = Admission(client, names, "a")
    _advertise(client, names, version=0, retired=0)  # limit = (1 + 1) x 4 + 0 = 8
    assert adm.acquire(5, StopFlag(), lambda: False) == 5
    assert adm.acquire(5, StopFlag(), lambda: False) == 3
    assert adm.acquire(1, _stop_soon(), lambda: False) == 0  # full: waits, then stops empty-handed
    assert adm.held() == 8
    _advertise(client, names, version=1, retired=4)  # the learner trained one batch and published v1
    assert adm.acquire(8, StopFlag(), lambda: False) == 4
    adm.release(2)
    assert adm.acquire(8, StopFlag(), lambda: False) == 2
    assert adm.held() == 12
    adm.release()
    assert adm.held() == 0 and admission.leases(client, names) == {}


def test_racing_actors_never_exceed_the_bound(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("adm2")
    _advertise(client, names, version=3, retired=40, batch=8, staleness=2)  # limit = 3 x 8 + 40 = 64
    got: list[int] = []
    lock = threading.Lock()

    def actor(i: int) -> None:
        adm = Admission(redis.Redis.from_url(redis_url), names, f"racer-{i}")
        stop = _stop_soon(1.0)
        while not stop.is_set():
            n = adm.acquire(3, stop, lambda: False)
            with lock:
                got.append(n)

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sum(got) == 64
    assert _held(client, names) == 64


def test_a_dead_actors_lease_expires_and_its_slots_come_back(redis_url: str) -> None:
    """Reproduces issue 16 defect 2: an actor that dies holding slots (no heartbeat, no release: a SIGKILL) kept
    them forever on the shared INCRBY counter; now its lease expires and the next admission reclaims them."""
    client, names = redis.Redis.from_url(redis_url), Names("adm4")
    _advertise(client, names, version=0, retired=0)  # limit 8
    dead = Admission(client, names, "dead", lease_s=0.5)
    assert dead.acquire(8, StopFlag(), lambda: False) == 8
    assert client.sismember(names.actors, "dead")
    live = Admission(client, names, "live", lease_s=0.5)
    assert live.acquire(4, _stop_soon(0.2), lambda: False) == 0  # the lease still runs: nothing free
    assert live.acquire(4, _stop_soon(3.0), lambda: False) == 4  # expired: reclaimed by this very acquire
    assert admission.leases(client, names) == {"live": 4}
    assert not client.sismember(names.actors, "dead")  # it left the registry (a draining learner waits on it)
    assert client.zscore(names.admission_expiry, "dead") is None


def test_a_heartbeat_keeps_a_slow_actors_lease_and_leaving_frees_it(redis_url: str) -> None:
    """A live actor whose batch takes longer than its lease keeps its slots (the heartbeat renews the lease);
    once it leaves, they come back at once."""
    client, names = redis.Redis.from_url(redis_url), Names("adm5")
    _advertise(client, names, version=0, retired=0)  # limit 8
    heartbeat = Heartbeat(client, names, "slow", lease_s=0.6).start()
    try:
        assert Admission(client, names, "slow", lease_s=0.6).acquire(8, StopFlag(), lambda: False) == 8
        other = Admission(client, names, "other", lease_s=0.6)
        assert other.acquire(1, _stop_soon(2.0), lambda: False) == 0  # three leases long: still held
        assert admission.leases(client, names) == {"slow": 8}
    finally:
        heartbeat.close()
    assert not client.sismember(names.actors, "slow") and admission.leases(client, names) == {}
    assert other.acquire(8, StopFlag(), lambda: False) == 8


def test_publishing_spends_the_lease_and_counts_the_producer(redis_url: str) -> None:
    """The publish script moves slots from the lease to the ledger and counts them for the producer, together;
    a publish retried after a lost reply (the ids already in the ledger) changes neither."""
    client, names = redis.Redis.from_url(redis_url), Names("adm6")
    _advertise(client, names, version=0, retired=0)  # limit 8
    adm = Admission(client, names, "actor-a")
    assert adm.acquire(4, StopFlag(), lambda: False) == 4
    queue = StreamQueue(client, names.rollouts, names=names)
    msgs = [_rollout(i) for i in range(3)]
    for _ in range(2):  # the second time: a retry, every id known
        queue.publish_many(msgs, ledger_outcome=ledger.PRODUCED, producer="actor-a")
        assert adm.held() == 1
        assert client.hget(names.produced_by, "actor-a") == b"3" and client.xlen(names.rollouts) == 3
    other = Admission(client, names, "actor-b")
    assert other.acquire(8, StopFlag(), lambda: False) == 4  # 8 - 3 published - 1 held
    adm.release()
    assert admission.leases(client, names) == {"actor-b": 4}


def test_a_publish_that_times_out_on_back_pressure_gives_the_slots_back(redis_url: str, tiny_assets: Path) -> None:
    """Reproduces issue 16 defect 2 (third trigger): an actor whose publish raised `BackpressureTimeout` kept its
    batch's slots (they were returned only when generation raised, or on SIGTERM)."""
    paths = asset_paths(tiny_assets)
    cfg = ActorConfig.model_validate({"model_dir": str(paths.student_dir), "prompts_file": str(paths.prompts_file),
                                      "batch_size": 4, "max_new_tokens": 4, "schedule": "full"})
    transport = TransportConfig(redis_url=redis_url, namespace=f"adm7-{uuid.uuid4().hex[:8]}", high_water=1,
                                backpressure_timeout_s=0.5)
    actor = Actor(cfg, transport, actor_id="stuck", stop=StopFlag())
    _advertise(actor.client, actor.names, version=0, retired=0)
    actor.client.xadd(actor.names.rollouts, {b"m": b"x"})  # a backlog at the mark that nobody consumes
    started = time.monotonic()
    with pytest.raises(BackpressureTimeout):
        actor.step()
    assert time.monotonic() - started < 60
    assert admission.leases(actor.client, actor.names) == {}, "the batch's slots were kept"
    assert actor.in_hand == 0
