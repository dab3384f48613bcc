"""Producers faster than consumers for a sustained period: back-pressure bounds the backlog, Redis memory
stays bounded, nothing is trimmed unconsumed, and the rolled-up ledger stays small (issue 11, load).

The fault is real: two actors (admission control off, so back-pressure is their only brake) and a teacher
on the tiny models, all separate processes on a Redis of the test's own, feed a learner that is paused
with SIGSTOP until both streams are full and then held paused while the backlog is sampled, then resumed.
While the run goes on, the test process also rolls the ledger up (`ledger.rollup` with `keep_s=0`: what the
learner does every `transport.ledger_rollup_every_s`, without the wait that covers publish retries, so a
short run shows the steady state; the learner's own rollup runs alongside, which also shows two at once).

Pins (docs/reliability.md, "Load and bounded memory", has the figures and why each bound holds):
- XLEN of each stream never exceeds `high_water` plus one batch per producer (the room check precedes a
  producer's publish of its batch, so each producer can overshoot by at most what it publishes after it);
- used_memory never exceeds the start plus the bounded contents: the two backlogs, the learner's journal
  (`checkpoint_every` steps), the ledger at its largest, and a fixed allowance for Redis' own buffers;
- every produced prefix is accounted for exactly once (trained, dropped, dead), read from counters + fields;
- with the rollup the ledger's HLEN stays below a bound that does not grow with the run, while the number
  of prefixes is several times that bound (without the rollup HLEN would be that number).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from conftest import free_port
from roles import (
    Pipeline,
    RedisServer,
    assert_conserved_and_trained_once,
    metric,
    pipeline_overrides,
    wait_until,
)

from protocol import ledger
from protocol.names import Names

pytestmark = pytest.mark.integration

HIGH_WATER = 8
ACTORS, ACTOR_BATCH, TEACHER_BATCH, LEARNER_BATCH = 2, 4, 4, 4
STEPS, CHECKPOINT_EVERY = 60, 5
PAUSED_SAMPLES = 40  # backlog samples taken while the learner is paused and both streams are full
ROLLOUTS_BOUND = HIGH_WATER + ACTORS * ACTOR_BATCH
SCORED_BOUND = HIGH_WATER + TEACHER_BATCH
IN_FLIGHT = ROLLOUTS_BOUND + SCORED_BOUND + 3 * LEARNER_BATCH  # + the learner's prefetch (2 batches) and batch in hand
# Fields left after a rollup: the ids in flight, plus those settled too recently to fold, which the fold
# holds back until what was in the rollouts and then the scored backlog has drained: one more in-flight's
# worth, plus whatever settled since the rollup two samples back (its marks are the ones usable now; a
# test process starved by a loaded machine samples less often, and this term grows with the gap, not the run).
LEDGER_BOUND = 2 * IN_FLIGHT
REDIS_OVERHEAD = 2 << 20  # client buffers of the 4 roles, script cache, dict rehashing: fixed, not per prefix


@dataclass
class Samples:
    rollouts: list[int] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)
    used_memory: list[int] = field(default_factory=list)
    ledger_fields: list[int] = field(default_factory=list)
    settled: list[int] = field(default_factory=list)  # ids trained, dropped or dead so far (counters)
    entry_bytes: int = 0  # the largest stream entry seen (MEMORY USAGE of a stream / its length)

    def take(self, client: redis.Redis, names: Names) -> None:
        ledger.rollup(client, names, keep_s=0)
        for key, out in ((names.rollouts, self.rollouts), (names.scored, self.scored)):
            n = int(client.xlen(key))
            out.append(n)
            if n:
                self.entry_bytes = max(self.entry_bytes, int(client.memory_usage(key) or 0) // n)
        self.used_memory.append(int(client.info("memory")["used_memory"]))
        self.ledger_fields.append(int(client.hlen(names.ledger)))
        counts = ledger.counts(client, names)
        self.settled.append(sum(counts[s] for s in ledger.TERMINAL))

    def ledger_excess(self) -> list[int]:
        """Per sample, the fields beyond `LEDGER_BOUND` + what settled since two samples back (<= 0 when bounded)."""
        return [n - LEDGER_BOUND - (self.settled[k] - self.settled[max(k - 2, 0)])
                for k, n in enumerate(self.ledger_fields)]


def test_sustained_overload_stays_bounded_and_loses_nothing(tiny_assets: Path, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", free_port())
    server.start()
    names = Names("load")
    client = redis.Redis.from_url(server.url)
    start_memory = int(client.info("memory")["used_memory"])
    overrides = pipeline_overrides(server.url, names, tiny_assets, tmp_path, **{
        "transport.high_water": HIGH_WATER, "actor.admission_control": "false", "actor.batch_size": ACTOR_BATCH,
        "teacher.batch_size": TEACHER_BATCH, "teacher.cache_enabled": "false", "learner.batch_size": LEARNER_BATCH,
        "learner.steps": STEPS, "learner.checkpoint_every": CHECKPOINT_EVERY, "learner.max_staleness": 1000,
        "transport.ledger_rollup_every_s": 1})
    pipe, samples = Pipeline(), Samples()
    try:
        learner = pipe.start("learner", "learner-0", overrides, tmp_path)
        pipe.start("teacher", "teacher-0", overrides, tmp_path)
        for i in range(ACTORS):
            pipe.start("actor", f"actor-{i}", overrides, tmp_path)
        wait_until("the learner training and rolling its ledger up",  # its own rollup: observes (keep_s 900)
                   lambda: (metric(client, names, "learner-0", "opd_learner_steps_total") or 0) >= 2
                   and (metric(client, names, "learner-0", "opd_learner_ledger_fields") or 0) > 0, pipe)
        learner.proc.send_signal(signal.SIGSTOP)
        try:
            def full() -> bool:
                samples.take(client, names)
                return samples.rollouts[-1] >= HIGH_WATER and samples.scored[-1] >= HIGH_WATER
            wait_until("both streams at the high-water mark behind the paused learner", full, pipe, poll_s=0.05)
            for _ in range(PAUSED_SAMPLES):  # producers keep trying; back-pressure holds them
                samples.take(client, names)
                time.sleep(0.05)
        finally:
            learner.proc.send_signal(signal.SIGCONT)

        def finished() -> bool:
            samples.take(client, names)
            return learner.proc.poll() is not None
        wait_until("the learner finishing", finished, pipe, timeout_s=600, poll_s=0.05)
        assert learner.proc.returncode == 0, learner.log()[-4000:]
    finally:
        pipe.stop_all()
    try:
        _check(client, names, samples, start_memory, tmp_path)
    finally:
        server.stop()


def _check(client: redis.Redis, names: Names, samples: Samples, start_memory: int, tmp_path: Path) -> None:
    assert max(samples.rollouts) >= HIGH_WATER and max(samples.scored) >= HIGH_WATER  # the overload was real
    assert max(samples.rollouts) <= ROLLOUTS_BOUND, samples.rollouts
    assert max(samples.scored) <= SCORED_BOUND, samples.scored

    counts = assert_conserved_and_trained_once(client, names, tmp_path / "learner")  # nothing trimmed unconsumed
    books = ledger.audit(client, names)
    journal = CHECKPOINT_EVERY * LEARNER_BATCH
    backlog = ROLLOUTS_BOUND + SCORED_BOUND + journal
    recent = max(samples.settled[k] - samples.settled[max(k - 2, 0)] for k in range(len(samples.settled)))
    bound = start_memory + REDIS_OVERHEAD + 2 * backlog * samples.entry_bytes + (LEDGER_BOUND + recent) * 256
    print(f"\nload: produced {books.total}, trained {counts[ledger.TRAINED]}, dropped {counts[ledger.DROPPED]}, "
          f"dead {counts[ledger.DEAD]}, duplicates {counts['duplicates']}; rollouts max {max(samples.rollouts)} "
          f"(bound {ROLLOUTS_BOUND}), scored max {max(samples.scored)} (bound {SCORED_BOUND}), high water "
          f"{HIGH_WATER}; used_memory start {start_memory} max {max(samples.used_memory)} end "
          f"{samples.used_memory[-1]} (bound {bound}, entry {samples.entry_bytes} B); ledger HLEN max "
          f"{max(samples.ledger_fields)} end {samples.ledger_fields[-1]} (bound {LEDGER_BOUND} + settled in the last 2 samples, at most {recent}) vs {books.total} "
          f"without rollup; rolled {books.rolled}; samples {len(samples.rollouts)}")
    assert counts[ledger.TRAINED] >= STEPS * LEARNER_BATCH and books.total >= 3 * LEDGER_BOUND, (books, LEDGER_BOUND)
    assert max(samples.ledger_excess()) <= 0, list(zip(samples.ledger_fields, samples.settled, strict=True))
    assert sum(books.rolled.values()) > 0 and books.rolled[ledger.TRAINED] > 0, books

    assert max(samples.used_memory) <= bound, (max(samples.used_memory), bound, samples.entry_bytes)
