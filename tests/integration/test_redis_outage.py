"""A client made by `protocol.streams.connect_role` rides out a real Redis outage (issue 11).

Pins (`protocol/reconnect.py`, against a redis-server of the test's own, killed with SIGKILL and
restarted from its AOF on the same port):
- a call made while Redis is down blocks, then returns the right value once Redis is back (the AOF kept
  it); the process counts one outage and logs exactly one line when it begins and one when it ends,
  with the duration, and no traceback; calls from two threads during the outage still make one outage;
- a connection the server closed (a restart between two calls) is reconnected at once, without an
  outage line;
- an outage longer than `reconnect_give_up_s` ends in `RedisUnavailable`, a plain ConnectionError whose
  message names the key; so does a stop requested during the outage;
- a wrong password is not an outage: it fails at once with the server's reason;
- the back-off is bounded: every wait lies in [step/2, step] with step = min(cap, base x 2^n);
- the role registries export `opd_redis_outages_total` and `opd_redis_outage_seconds_total`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import free_port
from prometheus_client import CollectorRegistry
from roles import RedisServer

from protocol.reconnect import Outages, ReconnectPolicy, RedisUnavailable, RideOutRetry
from protocol.telemetry import actor_metrics

pytestmark = pytest.mark.integration

FAST = ReconnectPolicy(base_s=0.05, cap_s=0.2, give_up_s=120)


def _client(url: str, outages: Outages, policy: ReconnectPolicy = FAST) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                retry=RideOutRetry(policy, "test-redis", outages=outages))


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_calls_ride_out_a_redis_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="protocol.reconnect")
    server = RedisServer(tmp_path / "redis", free_port())
    server.start()
    try:
        outages = Outages()
        client = _client(server.url, outages)
        client.set("k", "before")
        server.kill()
        results: dict[str, object] = {}

        def call(name: str) -> None:
            try:
                results[name] = client.get("k")
            except Exception as exc:  # surfaced by the assertion below
                results[name] = exc

        threads = [threading.Thread(target=call, args=(f"t{i}",)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while outages.since is None:  # both calls are failing and waiting: the outage has begun
            assert time.monotonic() < deadline, "no outage was recorded while Redis was down"
            time.sleep(0.02)
        server.start()  # same port, same data dir: the AOF has "k"
        for t in threads:
            t.join(timeout=120)
        assert results == {"t0": b"before", "t1": b"before"}
        for _ in range(3):  # the outage ends after a few successful calls in a row
            assert client.get("k") == b"before"
        assert outages.since is None and outages.count == 1 and outages.seconds > 0
        assert len(_lines(caplog, "unreachable")) == 1
        [back] = _lines(caplog, "reachable again")
        assert "outage" in back and "test-redis" in back
        assert not any(r.exc_info for r in caplog.records)

        # A restart between two calls: the pooled connection is dead, one immediate reconnect cures it.
        server.stop()
        server.start()
        assert client.get("k") == b"before"
        assert outages.count == 1 and len(_lines(caplog, "unreachable")) == 1
    finally:
        server.stop()


def test_an_outage_past_give_up_is_a_clear_error(tmp_path: Path) -> None:
    outages = Outages()
    client = _client(f"redis://127.0.0.1:{free_port()}/0", outages, ReconnectPolicy(0.01, 0.05, give_up_s=0.3))
    with pytest.raises(RedisUnavailable, match=r"transport\.reconnect_give_up_s") as info:
        client.get("k")
    assert isinstance(info.value, ConnectionError) and not isinstance(info.value, redis.RedisError)
    assert outages.count == 1


def test_a_stop_during_an_outage_ends_the_wait(tmp_path: Path) -> None:
    outages = Outages()
    stop = threading.Event()
    outages.should_stop = stop.is_set
    client = _client(f"redis://127.0.0.1:{free_port()}/0", outages)
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(RedisUnavailable, match="stopping while Redis"):
        client.get("k")


def test_a_wrong_password_fails_at_once(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", free_port())
    server.start(password="right")
    try:
        outages = Outages()
        client = redis.Redis.from_url(server.url, password="wrong", socket_connect_timeout=5,
                                      retry=RideOutRetry(FAST, "test-redis", outages=outages))
        with pytest.raises(redis.AuthenticationError):
            client.ping()
        assert outages.count == 0
    finally:
        server.stop()


def test_back_off_is_bounded_and_jittered() -> None:
    policy = ReconnectPolicy(base_s=0.1, cap_s=2.0, give_up_s=60)
    rng = random.Random(0)
    for attempt in range(1, 20):
        step = min(2.0, 0.1 * 2 ** (attempt - 1))
        waits = [policy.delay(attempt, rng) for _ in range(50)]
        assert all(step / 2 <= w <= step for w in waits), (attempt, waits)
        assert len(set(waits)) > 1  # jitter: replicas do not retry in lock-step


def test_role_registries_export_the_outage_counters() -> None:
    registry = CollectorRegistry()
    actor_metrics(registry)
    assert registry.get_sample_value("opd_redis_outages_total") is not None
    assert registry.get_sample_value("opd_redis_outage_seconds_total") is not None
