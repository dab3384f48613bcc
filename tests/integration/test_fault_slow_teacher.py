"""A slow but live teacher cannot make the learner train a prefix twice (issue 8, defect 2).

The fault is real: teacher-0, a separate process, is paused with SIGSTOP while it holds entries of the
rollouts stream, stays paused past `transport.claim_idle_ms` so teacher-1 reclaims (XAUTOCLAIM) and
forwards them, then gets SIGCONT and finishes the batch it was working on.

Pins:
- teacher-0's forward of the entries it lost is refused by the ownership fence
  (`opd_teacher_forwards_refused_total` counts at least those), and so the learner sees no copy:
  its duplicate counter stays 0;
- every prefix is trained exactly once (the learner's lineage), and the ledger conserves
  (produced = trained + dropped + dead, nothing still in flight);
- a copy that does reach the learner (published by hand with an id already in flight or trained) is
  refused there and counted, so the learner's check holds even where the fence cannot.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis
from roles import (
    Pipeline,
    assert_conserved_and_trained_once,
    held_by,
    metric,
    pause_while_holding,
    pipeline_overrides,
    wait_until,
)

from protocol import ledger
from protocol.messages import ScoredPrefix, decode
from protocol.names import Names
from protocol.streams import StreamQueue

pytestmark = pytest.mark.integration

CLAIM_IDLE_MS = 4000


def test_paused_teacher_past_claim_timeout_forwards_nothing_twice(redis_url: str, tiny_assets: Path,
                                                                  tmp_path: Path) -> None:
    names = Names("slowteacher")
    client = redis.Redis.from_url(redis_url)
    overrides = pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **{
        "transport.claim_idle_ms": CLAIM_IDLE_MS, "learner.steps": 24, "learner.max_staleness": 4})
    pipe = Pipeline()
    logs = tmp_path
    try:
        pipe.start("learner", "learner-0", overrides, logs)
        for i in range(2):
            pipe.start("teacher", f"teacher-{i}", overrides, logs)
        pipe.start("actor", "actor-0", overrides, logs)
        wait_until("teacher-0 serving metrics",
                   lambda: metric(client, names, "teacher-0", "opd_teacher_prefixes_total") is not None, pipe)

        held = pause_while_holding(client, names, pipe, "teacher-0")
        wait_until("teacher-1 reclaiming what teacher-0 holds",
                   lambda: not set(held) & set(held_by(client, names, "teacher-0")), pipe)
        pipe.roles["teacher-0"].proc.send_signal(signal.SIGCONT)
        wait_until("teacher-0's forward of the lost entries refused",
                   lambda: (metric(client, names, "teacher-0", "opd_teacher_forwards_refused_total") or 0) >= len(held),
                   pipe)

        learner = pipe.roles["learner-0"]
        wait_until("the learner finishing", lambda: learner.proc.poll() is not None, pipe, timeout_s=600)
        assert learner.proc.returncode == 0, learner.log()[-4000:]
    finally:
        pipe.stop_all()

    counts = assert_conserved_and_trained_once(client, names, tmp_path / "learner")
    assert counts["duplicates"] == 0, counts  # the fence stopped every copy before the learner
    assert counts[ledger.TRAINED] >= 24 * 4
    assert "no longer owns" in pipe.roles["teacher-0"].log()


def test_learner_refuses_copies_that_reach_it(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    """Copies on the scored stream (what an unfenced forward or a retried publish would make): trained once."""
    names = Names("copies")
    client = redis.Redis.from_url(redis_url)
    # No staleness drops: a copy read after its original was dropped would be a first training, not a copy.
    overrides = pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **{
        "learner.steps": 6, "learner.max_staleness": 1000})
    pipe = Pipeline()
    copied: list[str] = []
    try:
        pipe.start("learner", "learner-0", overrides, tmp_path)
        pipe.start("teacher", "teacher-0", overrides, tmp_path)
        pipe.start("actor", "actor-0", overrides, tmp_path)
        scored = StreamQueue(client, names.scored, names=names)

        def copy_some() -> bool:
            for _eid, fields in client.xrange(names.scored, count=8):
                m = decode(fields[b"m"], expect=ScoredPrefix)
                if m.id not in copied and len(copied) < 4:
                    scored.publish(m)  # a second entry with the same id, while the original is in flight
                    copied.append(m.id)
            return len(copied) >= 4

        wait_until("scored prefixes to copy", copy_some, pipe, poll_s=0.02)
        learner = pipe.roles["learner-0"]
        wait_until("the learner finishing", lambda: learner.proc.poll() is not None, pipe, timeout_s=600)
        assert learner.proc.returncode == 0, learner.log()[-4000:]
    finally:
        pipe.stop_all()
    counts = assert_conserved_and_trained_once(client, names, tmp_path / "learner")
    assert counts["duplicates"] == len(copied), counts
    assert all(ledger.outcome_of(client, names, i) == ledger.TRAINED for i in copied)
    assert "copies of prefixes already trained or in flight" in pipe.roles["learner-0"].log()
