"""The ledger rollup (protocol/ledger.py) on a real redis-server.

Pins: terminal fields fold into `ledger:rolled` only when old enough (`keep_s`) and once no entry from
before they were seen terminal is left in the rollouts and then the scored stream; ids in flight never
fold; the books (`audit`) conserve before and after; two rollups at once, or one SIGKILLed half-way,
count every id exactly once; a copy of a trained id still in a stream holds its field back until the
learner has refused it; a publish retried within `keep_s` is still skipped; the config refuses a
`ledger_keep_s` shorter than a publish retry can take.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import redis
from pydantic import ValidationError

from learner.inflight import LearnerQueue
from learner.journal import StepJournal
from protocol import ledger
from protocol.config import TransportConfig
from protocol.messages import ScoredPrefix
from protocol.names import Names
from protocol.streams import Settle, StreamQueue

pytestmark = pytest.mark.integration


def _message(i: int) -> ScoredPrefix:
    R, K = 3, 2
    return ScoredPrefix(
        prompt_ids_P=np.array([1, 4 + i], np.int32), response_ids_R=np.array([5, 6, 7], np.int32),
        behaviour_logprobs_R=np.full(R, -1.0, np.float32), prompt_index=i, horizon=R, max_new_tokens=R,
        finished=False, policy_version=0, actor_id="a", teacher_logprobs_R=np.full(R, -0.5, np.float32),
        topk_ids_RK=np.tile(np.arange(K, dtype=np.int32), (R, 1)), topk_logprobs_RK=np.full((R, K), -1.0, np.float32),
    )


def _settled(client: redis.Redis, names: Names, n: int, outcome: str = ledger.TRAINED) -> list[str]:
    """`n` ids produced then recorded terminal, as the roles do (no stream entries left behind)."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    for i in range(0, n, 500):
        ledger.record(client, names, {m: ledger.PRODUCED for m in ids[i:i + 500]})
        ledger.record(client, names, {m: outcome for m in ids[i:i + 500]})
    return ids


def _roll_until(client: redis.Redis, names: Names, want: int, *, keep_s: float = 0.0) -> int:
    """Run the rollup until `want` ids folded in all (it needs two runs a clock tick apart); returns runs."""
    deadline = time.monotonic() + 30
    runs = 0
    while sum(ledger.rolled(client, names).values()) < want:
        assert time.monotonic() < deadline, (ledger.rolled(client, names), client.hlen(names.ledger))
        ledger.rollup(client, names, keep_s=keep_s)
        runs += 1
        time.sleep(0.005)
    return runs


def _assert_books(client: redis.Redis, names: Names) -> ledger.Audit:
    books = ledger.audit(client, names)
    assert books.conserved, books
    return books


def test_terminal_fields_fold_and_the_books_still_balance(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("roll1")
    trained, dropped, dead = _settled(client, names, 30), _settled(client, names, 5, ledger.DROPPED), \
        _settled(client, names, 2, ledger.DEAD)
    in_flight = _settled(client, names, 4, ledger.PRODUCED)
    before = ledger.counts(client, names)
    first = ledger.rollup(client, names, keep_s=0)
    assert first.observed == 37 and first.folded == 0  # the first run only notes when it saw the streams
    assert _roll_until(client, names, 37) >= 1
    assert ledger.rolled(client, names) == {ledger.TRAINED: 30, ledger.DROPPED: 5, ledger.DEAD: 2}
    assert ledger.counts(client, names) == before  # the totals are untouched: admission and drain read them
    assert {k.decode() for k in client.hkeys(names.ledger)} == set(in_flight)
    books = _assert_books(client, names)
    assert books.total == 41 and client.zcard(names.key(ledger.RETIRED)) == 0
    assert all(ledger.outcome_of(client, names, m) is None for m in trained + dropped + dead)


def test_nothing_folds_before_keep_s(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("roll2")
    _settled(client, names, 10)
    for _ in range(5):
        assert ledger.rollup(client, names, keep_s=3600).folded == 0
        time.sleep(0.005)
    assert client.hlen(names.ledger) == 10 and client.zcard(names.key(ledger.RETIRED)) == 10
    _assert_books(client, names)


@pytest.mark.parametrize("stream", ["rollouts", "scored"])
def test_an_older_entry_still_in_a_stream_holds_the_fold_back(redis_url: str, stream: str) -> None:
    """Pending (or undelivered) work from before an id turned terminal might carry it: wait until it is settled."""
    client, names = redis.Redis.from_url(redis_url), Names("roll3" + stream)
    q = StreamQueue(client, getattr(names, stream), names=names, consumer="c")
    old = _message(0)
    q.publish(old, ledger_outcome=ledger.PRODUCED)
    [held] = q.read(1, block_ms=100)  # pending for consumer c
    _settled(client, names, 8)
    for _ in range(6):
        assert ledger.rollup(client, names, keep_s=0).folded == 0
        time.sleep(0.005)
    assert q.settle([Settle(held.entry_id, old.id, ledger.TRAINED)]).done == [held.entry_id]
    _roll_until(client, names, 9)  # the held one too, once it is terminal and the stream is clear
    assert client.hlen(names.ledger) == 0
    _assert_books(client, names)


def test_concurrent_rollups_count_each_id_once(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("roll4")
    n = 3000
    _settled(client, names, n)
    ledger.rollup(client, names, keep_s=0)
    time.sleep(0.01)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            c = redis.Redis.from_url(redis_url)
            while sum(ledger.rolled(c, names).values()) < n:
                ledger.rollup(c, names, keep_s=0, batch=50)  # small scripts: the two interleave
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert ledger.rolled(client, names)[ledger.TRAINED] == n and client.hlen(names.ledger) == 0
    _assert_books(client, names)


def test_a_rollup_killed_midway_loses_and_doubles_nothing(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("roll5")
    n = 4000
    _settled(client, names, n)
    ledger.rollup(client, names, keep_s=0)
    time.sleep(0.01)
    code = (f"import redis; from protocol import ledger; from protocol.names import Names\n"
            f"c = redis.Redis.from_url({redis_url!r})\n"
            f"while True: ledger.rollup(c, Names({names.namespace!r}), keep_s=0, batch=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while sum(ledger.rolled(client, names).values()) < 50:  # killed once it is busy folding
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    partial = ledger.rolled(client, names)[ledger.TRAINED]
    assert 0 < partial < n, partial
    _assert_books(client, names)  # after the kill, before anything else runs
    _roll_until(client, names, n)
    assert ledger.rolled(client, names)[ledger.TRAINED] == n and client.hlen(names.ledger) == 0
    _assert_books(client, names)


def test_a_late_copy_of_a_trained_id_is_refused_and_only_then_folds(redis_url: str) -> None:
    """A copy on the scored stream (a slow teacher's forward, a retried publish) keeps its id's field until
    the learner has refused it; afterwards nothing can carry the id, and it folds."""
    client, names = redis.Redis.from_url(redis_url), Names("roll6")
    producer = StreamQueue(client, names.scored, names=names)
    m = _message(1)
    producer.publish(m, ledger_outcome=ledger.PRODUCED)
    q = LearnerQueue(client, names.scored, names=names, consumer="learner-0", expect=ScoredPrefix)
    journal = StepJournal(client, names, stream=q.stream, group=q.group, consumer=q.consumer, rank=0,
                          max_bytes=q.max_bytes)
    first = q.read(1, block_ms=100)
    assert journal.refuse_duplicates(first) == (first, [])
    producer.publish(m)  # the copy, still undelivered
    journal.commit(1, 1, first)
    for _ in range(6):
        assert ledger.rollup(client, names, keep_s=0).folded == 0
        time.sleep(0.005)
    assert ledger.outcome_of(client, names, m.id) == ledger.TRAINED
    fresh = StepJournal(client, names, stream=q.stream, group=q.group, consumer=q.consumer, rank=0,
                        max_bytes=q.max_bytes)  # a restarted learner: it remembers nothing, Redis refuses
    copy = q.read(1, block_ms=100)
    assert fresh.refuse_duplicates(copy) == ([], copy)
    _roll_until(client, names, 1)
    assert ledger.rolled(client, names)[ledger.TRAINED] == 1 and ledger.duplicates(client, names) == 1
    _assert_books(client, names)


def test_a_publish_retried_within_keep_s_is_still_skipped(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("roll7")
    q = StreamQueue(client, names.rollouts, names=names, consumer="t")
    m = _message(2)
    q.publish(m, ledger_outcome=ledger.PRODUCED)
    [d] = q.read(1, block_ms=100)
    q.settle([Settle(d.entry_id, m.id, ledger.TRAINED)])
    for _ in range(4):
        ledger.rollup(client, names, keep_s=3600)
    assert q.publish(m, ledger_outcome=ledger.PRODUCED) is None  # the retry of a publish whose reply was lost
    assert client.xlen(names.rollouts) == 0
    _assert_books(client, names)


def test_periodic_rollup_runs_at_most_every_every_s(redis_url: str) -> None:
    client, names = redis.Redis.from_url(redis_url), Names("roll8")
    _settled(client, names, 3)
    seen: list[ledger.RollupResult] = []
    periodic = ledger.PeriodicRollup(client, names, every_s=3600, keep_s=0, on_result=seen.append, background=False)
    assert periodic.maybe_run() and not periodic.maybe_run() and len(seen) == 1 and seen[0].observed == 3
    assert not ledger.PeriodicRollup(client, names, every_s=0, keep_s=0).maybe_run()
    threaded = ledger.PeriodicRollup(client, names, every_s=3600, keep_s=0, on_result=seen.append)
    assert threaded.maybe_run()  # on its own thread: the learner's step does not wait for the scan
    threaded.join(timeout=30)
    assert len(seen) == 2 and seen[1].observed == 0  # seen terminal by the first pass already


def test_keep_s_must_outlast_a_publish_retry() -> None:
    with pytest.raises(ValidationError, match=r"transport\.ledger_keep_s"):
        TransportConfig(ledger_keep_s=60)
    TransportConfig(ledger_keep_s=60, ledger_rollup_every_s=0)  # rollup off: nothing to protect
    cfg = TransportConfig(reconnect_give_up_s=5, reconnect_cap_s=1, ledger_keep_s=81)
    assert cfg.ledger_keep_s >= ledger.min_keep_s(cfg.reconnect_give_up_s, cfg.reconnect_cap_s)
