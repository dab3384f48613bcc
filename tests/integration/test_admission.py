"""Producer-side staleness control (actors.actor.Admission) against a real Redis.

Pins: no work is admitted before a learner publishes its state, nor while the state there is malformed
(the reason is kept, not raised); at most
(max_staleness + 1) x batch_size + retired prefixes are ever admitted, also when actors race for the
last slots; slots come back as the learner retires work (trained, dropped or dead) as of its last
published version; stopping while waiting admits nothing; released slots are reusable.
"""

from __future__ import annotations

import threading

import pytest
import redis

from actors.actor import Admission
from protocol.names import Names
from protocol.runtime import StopFlag
from protocol.state import LearnerState, StateUnavailable, publish_state

pytestmark = pytest.mark.integration


def _advertise(client: redis.Redis, names: Names, *, version: int, retired: int, batch: int = 4, staleness: int = 1) -> None:
    publish_state(client, names, LearnerState(version=version, step=version, batch_size=batch, max_staleness=staleness,
                                              retired=retired))


def _stop_soon(seconds: float = 0.3) -> StopFlag:
    stop = StopFlag()
    threading.Timer(seconds, stop.set).start()
    return stop


def test_nothing_is_admitted_before_a_learner_advertises(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("adm0")
    assert Admission(client, names).acquire(4, _stop_soon(), lambda: False) == 0
    assert client.get(names.admission) is None


def test_a_malformed_state_admits_nothing_and_says_why(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("adm3")
    client.set(names.learner_state, b"\x81\xa4kind\xa7weights")  # valid msgpack, not a learner state
    adm = Admission(client, names)
    assert adm.acquire(4, _stop_soon(), lambda: False) == 0
    assert client.get(names.admission) is None
    assert isinstance(adm.state, StateUnavailable) and adm.state.malformed and "kind" in adm.state.reason
    _advertise(client, names, version=0, retired=0)  # a valid state replaces it: admission resumes
    assert adm.acquire(4, StopFlag(), lambda: False) == 4


def test_bound_and_refill(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("adm1")
    adm = Admission(client, names)
    _advertise(client, names, version=0, retired=0)  # limit = (1 + 1) x 4 + 0 = 8
    assert adm.acquire(5, StopFlag(), lambda: False) == 5
    assert adm.acquire(5, StopFlag(), lambda: False) == 3
    assert adm.acquire(1, _stop_soon(), lambda: False) == 0  # full: waits, then stops empty-handed
    assert int(client.get(names.admission)) == 8
    _advertise(client, names, version=1, retired=4)  # the learner trained one batch and published v1
    assert adm.acquire(8, StopFlag(), lambda: False) == 4
    adm.release(2)
    assert adm.acquire(8, StopFlag(), lambda: False) == 2
    assert int(client.get(names.admission)) == 12


def test_racing_actors_never_exceed_the_bound(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("adm2")
    _advertise(client, names, version=3, retired=40, batch=8, staleness=2)  # limit = 3 x 8 + 40 = 64
    got: list[int] = []
    lock = threading.Lock()

    def actor() -> None:
        adm = Admission(redis.Redis.from_url(redis_url), names)
        stop = _stop_soon(1.0)
        while not stop.is_set():
            n = adm.acquire(3, stop, lambda: False)
            with lock:
                got.append(n)

    threads = [threading.Thread(target=actor) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sum(got) == 64
    assert int(client.get(names.admission)) == 64
