"""Run stats are added exactly once, also when a lost reply makes the client retry (issue 16, defect 3).

Why it matters: `learner.max_flops` stops training on these totals and the experiment chooses its compute
marks from them, so an update counted twice stops a run early and moves the marks.

Pins (`protocol/ledger.py` `add_stats`, `StatsWriter`, against a real redis-server):
- an update repeated with the same ``(writer, seq)`` is refused and counts once; the writer's next update
  and another writer's first one are applied;
- a reply lost for real (a TCP proxy in front of Redis closes the connection instead of passing the reply
  on) makes `protocol/reconnect.py`'s retry send the update again: it still counts once.
"""

from __future__ import annotations

import pytest
import redis
from reply_dropper import ReplyDropper

from protocol import ledger
from protocol.names import Names
from protocol.reconnect import Outages, ReconnectPolicy, RideOutRetry

pytestmark = pytest.mark.integration


def test_a_repeated_update_counts_once(redis_url: str) -> None:
    """Fails before the fix (no ``(writer, seq)``: every call added again)."""
    client = redis.Redis.from_url(redis_url)
    names = Names("stats")
    assert ledger.add_stats(client, names, writer="actor-0:1:a", seq=1, flops_generation=1e12, actor_prefixes=4)
    assert not ledger.add_stats(client, names, writer="actor-0:1:a", seq=1, flops_generation=1e12, actor_prefixes=4)
    assert ledger.stats(client, names) == {"flops_generation": 1e12, "actor_prefixes": 4.0}
    assert ledger.add_stats(client, names, writer="actor-0:1:a", seq=2, flops_generation=1e12)
    assert not ledger.add_stats(client, names, writer="actor-0:1:a", seq=1, flops_generation=1e12)  # older: a repeat
    assert ledger.add_stats(client, names, writer="actor-0:2:b", seq=1, flops_generation=1e12)  # a restarted process
    assert ledger.stats(client, names) == {"flops_generation": 3e12, "actor_prefixes": 4.0}
    two = ledger.StatsWriter(client, names, "teacher-0"), ledger.StatsWriter(client, names, "teacher-0")
    assert two[0].writer != two[1].writer  # same role id, two processes: numbered apart
    assert all(w.add(teacher_prefixes=1) for w in two) and ledger.stats(client, names)["teacher_prefixes"] == 2.0


def test_a_reply_lost_mid_retry_counts_once(redis_url: str) -> None:
    """The retry of `protocol/reconnect.py` re-sends an update Redis already applied: refused, counted once.

    Fails before the fix: the retried HINCRBYFLOAT added the FLOPs a second time.
    """
    retry = RideOutRetry(ReconnectPolicy(base_s=0.05, cap_s=0.2, give_up_s=30), "proxied-redis", outages=Outages())
    names = Names("stats-lost")
    with ReplyDropper.in_front_of(redis_url) as dropper:
        client = redis.Redis.from_url(dropper.url(), socket_timeout=10, retry=retry)
        writer = ledger.StatsWriter(client, names, "learner-rank0")
        assert writer.add(flops_learner=6e9, learner_steps=1)
        dropper.armed.set()
        writer.add(flops_learner=6e9, learner_steps=1)  # the reply is lost; the client reconnects and sends it again
        assert dropper.dropped == 1 and dropper.connections == 2, "the reply was not lost: the test proved nothing"
        direct = redis.Redis.from_url(redis_url)
        assert ledger.stats(direct, names) == {"flops_learner": 12e9, "learner_steps": 2.0}
        assert writer.add(flops_learner=6e9, learner_steps=1)
        assert ledger.stats(direct, names) == {"flops_learner": 18e9, "learner_steps": 3.0}
