"""The learner's delivery machinery on a real Redis: step journal, commit, keeping entries claimed, take-back.

Pins:
- `StepJournal.commit` moves a batch from the scored stream into the journal, acks and deletes it and
  records it `trained`, all at once; if an entry is no longer this consumer's it raises `CommitError`
  and changes nothing in either stream nor in the ledger (issue 16: each failure reply of the script is
  pinned, and a refused commit leaves the ids `produced`, so a restart and the rank that took entries over
  train them all, once; also when the other rank took them by XAUTOCLAIM);
- `load` returns the journaled steps after a checkpoint (with their messages, in order), deletes the older
  ones, and refuses a journal with a gap; `forget_through` deletes what a checkpoint now holds;
- `keep_claimed` stops `XAUTOCLAIM` (another consumer, or this process's own prefetch thread) from taking
  entries a live learner holds, without counting a delivery;
- `recover_own` re-delivers this consumer's pending entries at once, counts the delivery, and
  dead-letters an entry past `max_deliveries`;
- `orphaned_journals` finds journals of ranks a restarted run does not have (and ignores emptied ones);
- a commit retried after its first attempt went through (reply lost) returns that step, changes nothing;
- `refuse_duplicates` refuses a copy of an id already trained, a second entry of an id in flight (in one
  read or another consumer's), and an id this process committed even if Redis lost its `trained` record;
  each refused copy is acked, deleted and counted once; the original entry is admitted again when re-read.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
from reply_dropper import ReplyDropper

from learner.inflight import InFlight, LearnerQueue
from learner.journal import CommitError, StepJournal, orphaned_journals
from protocol import ledger
from protocol.messages import ScoredPrefix
from protocol.names import Names
from protocol.reconnect import Outages, ReconnectPolicy, RideOutRetry
from protocol.streams import Delivery, StreamQueue, read_dead_letters

pytestmark = pytest.mark.integration


def _message(i: int) -> ScoredPrefix:
    R, K = 3, 2
    return ScoredPrefix(
        prompt_ids_P=np.array([1, 4 + i], np.int32), response_ids_R=np.array([5, 6, 7], np.int32),
        behaviour_logprobs_R=np.full(R, -1.0, np.float32), prompt_index=i, horizon=R, max_new_tokens=R,
        finished=False, policy_version=0, actor_id="a", teacher_logprobs_R=np.full(R, -0.5, np.float32),
        topk_ids_RK=np.tile(np.arange(K, dtype=np.int32), (R, 1)), topk_logprobs_RK=np.full((R, K), -1.0, np.float32),
    )


def _setup(redis_url: str, n: int, *, consumer: str = "learner-0", claim_idle_ms: int = 60_000,
           max_deliveries: int = 3) -> tuple[redis.Redis, Names, LearnerQueue, list[ScoredPrefix]]:
    client = redis.Redis.from_url(redis_url)
    names = Names("jt")
    messages = [_message(i) for i in range(n)]
    producer = StreamQueue(client, names.scored, names=names)
    for m in messages:
        producer.publish(m, ledger_outcome=ledger.PRODUCED)
    q = LearnerQueue(client, names.scored, names=names, consumer=consumer, expect=ScoredPrefix,
                     claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries)
    return client, names, q, messages


def _journal(client: redis.Redis, names: Names, q: LearnerQueue) -> StepJournal:
    return StepJournal(client, names, stream=q.stream, group=q.group, consumer=q.consumer, rank=0, max_bytes=q.max_bytes)


def test_commit_moves_the_batch_into_the_journal_atomically(redis_url: str) -> None:
    client, names, q, messages = _setup(redis_url, 4)
    batch = q.read(4, block_ms=100)
    journal = _journal(client, names, q)
    journal.commit(1, 1, batch[:3])
    assert client.xlen(names.scored) == 1 and int(client.xpending(names.scored, q.group)["pending"]) == 1
    assert client.xlen(journal.key) == 3
    assert [ledger.outcome_of(client, names, m.id) for m in messages] == [ledger.TRAINED] * 3 + [ledger.PRODUCED]

    # A restart after a checkpoint at step 0 replays step 1 with the same messages, in order.
    steps = _journal(client, names, q).load(after_step=0)
    assert [(s.step, s.version) for s in steps] == [(1, 1)]
    assert [m.id for m in steps[0].messages] == [m.id for m in messages[:3]]
    np.testing.assert_array_equal(steps[0].messages[1].topk_ids_RK, messages[1].topk_ids_RK)

    # The checkpoint at step 1 holds it: forgotten.
    journal.forget_through(1)
    assert client.xlen(journal.key) == 0


def test_commit_of_an_entry_taken_over_changes_nothing(redis_url: str) -> None:
    client, names, q, _ = _setup(redis_url, 2)
    batch = q.read(2, block_ms=100)
    client.xclaim(names.scored, q.group, "learner-1", 0, [batch[1].entry_id])  # another rank took it
    journal = _journal(client, names, q)
    with pytest.raises(CommitError, match="no longer pending for consumer learner-0"):
        journal.commit(1, 1, batch)
    assert client.xlen(names.scored) == 2 and client.xlen(journal.key) == 0
    assert int(client.xpending(names.scored, q.group)["pending"]) == 2


def test_load_skips_checkpointed_steps_and_refuses_gaps(redis_url: str) -> None:
    client, names, q, _ = _setup(redis_url, 6)
    batch = q.read(6, block_ms=100)
    journal = _journal(client, names, q)
    for step in (1, 2, 3):
        journal.commit(step, step, batch[2 * (step - 1): 2 * step])
    steps = _journal(client, names, q).load(after_step=1)
    assert [s.step for s in steps] == [2, 3]
    assert client.xlen(journal.key) == 4  # step 1's entries were deleted: the checkpoint holds them
    with pytest.raises(ValueError, match="different runs"):
        _journal(client, names, q).load(after_step=0)  # step 1 is gone: 2, 3 do not follow a checkpoint at 0


def test_empty_share_journals_a_marker(redis_url: str) -> None:
    client, names, q, _ = _setup(redis_url, 1)
    journal = _journal(client, names, q)
    journal.commit(1, 1, [])
    steps = _journal(client, names, q).load(after_step=0)
    assert [(s.step, s.messages) for s in steps] == [(1, [])]


def test_keep_claimed_stops_autoclaim(redis_url: str) -> None:
    client, names, q, _ = _setup(redis_url, 2, claim_idle_ms=100)
    batch = q.read(2, block_ms=100)
    held = [d.entry_id for d in batch]
    time.sleep(0.6)  # both are now idle past the other consumer's claim_idle_ms
    q.keep_claimed(held[:1])  # idle time back to 0: 500 ms of margin before it could be taken again
    other = LearnerQueue(client, names.scored, names=names, consumer="learner-1", expect=ScoredPrefix,
                         claim_idle_ms=500)
    taken = other.read(10, block_ms=10)
    assert [d.entry_id for d in taken] == held[1:]  # only the entry that was not kept claimed
    pending = {p["message_id"].decode(): p for p in client.xpending_range(names.scored, q.group, "-", "+", 10)}
    assert pending[held[0]]["consumer"] == b"learner-0" and pending[held[0]]["times_delivered"] == 1

    inflight = InFlight(q)
    assert inflight.refresh_s == pytest.approx(0.025)
    inflight.add(held)
    inflight.discard(held[1:])
    assert len(inflight) == 1


def test_recover_own_takes_back_at_once_and_dead_letters_past_the_limit(redis_url: str) -> None:
    client, names, q, messages = _setup(redis_url, 3, max_deliveries=2)
    first = q.read(3, block_ms=100)
    assert len(first) == 3
    restarted = LearnerQueue(client, names.scored, names=names, consumer="learner-0", expect=ScoredPrefix,
                             claim_idle_ms=600_000, max_deliveries=2)
    again = restarted.recover_own()
    assert [d.entry_id for d in again] == [d.entry_id for d in first]
    assert [d.deliveries for d in again] == [2, 2, 2]
    assert LearnerQueue(client, names.scored, names=names, consumer="learner-1", expect=ScoredPrefix).recover_own() == []

    assert restarted.recover_own() == []  # a third delivery is past max_deliveries=2
    dead = read_dead_letters(client, names)
    assert sorted(d.message_id for d in dead) == sorted(m.id for m in messages)
    assert all("delivered 3 times" in d.reason for d in dead)
    assert client.xlen(names.scored) == 0


def test_orphaned_journals_are_found(redis_url: str) -> None:
    client, names, q, _ = _setup(redis_url, 2)
    batch = q.read(2, block_ms=100)
    rank3 = StepJournal(client, names, stream=q.stream, group=q.group, consumer=q.consumer, rank=3, max_bytes=q.max_bytes)
    rank3.commit(1, 1, batch)
    assert orphaned_journals(client, names, 2) == {3: 2}
    assert orphaned_journals(client, names, 4) == {}
    rank3.forget_through(1)  # checkpointed: nothing left to replay, nothing to refuse
    assert orphaned_journals(client, names, 2) == {}


def test_commit_retried_after_a_lost_reply_returns_the_committed_step(redis_url: str) -> None:
    client, names, q, _ = _setup(redis_url, 2)
    batch = q.read(2, block_ms=100)
    journal = _journal(client, names, q)
    journal.commit(1, 1, batch)
    first = client.xrange(journal.key)
    journal.commit(1, 1, batch)  # what the reconnecting client does when the reply of EXEC was lost
    assert client.xrange(journal.key) == first
    assert ledger.counts(client, names)[ledger.TRAINED] == 2 and client.xlen(names.scored) == 0
    with pytest.raises(CommitError):  # a different step with the same (gone) entries is still refused
        journal.commit(2, 2, batch)


def _copy_on_stream(client: redis.Redis, names: Names, m: ScoredPrefix) -> None:
    """A second entry carrying an id already published (what a retried publish or a racing forward makes)."""
    StreamQueue(client, names.scored, names=names).publish(m)


def test_refuse_duplicates(redis_url: str) -> None:
    client, names, q, messages = _setup(redis_url, 3)
    journal = _journal(client, names, q)
    first = q.read(3, block_ms=100)
    admitted, refused = journal.refuse_duplicates(first)
    assert admitted == first and refused == []
    assert journal.refuse_duplicates(first) == (first, [])  # re-reading the holder (a restart) is not a copy

    # A copy of an id in flight (held by an entry still in the stream), and two copies in one read.
    _copy_on_stream(client, names, messages[0])
    _copy_on_stream(client, names, messages[2])
    _copy_on_stream(client, names, messages[2])
    copies = q.read(10, block_ms=100)
    assert [d.message.id for d in copies] == [messages[0].id, messages[2].id, messages[2].id]
    assert journal.refuse_duplicates(copies) == ([], copies)
    assert ledger.duplicates(client, names) == 3 and client.xlen(names.scored) == 3  # only the originals are left

    # Train the originals; a copy arriving later is refused because the ledger says trained.
    journal.commit(1, 1, first)
    _copy_on_stream(client, names, messages[1])
    [late] = q.read(1, block_ms=100)
    assert journal.refuse_duplicates([late]) == ([], [late])
    assert ledger.duplicates(client, names) == 4

    # Redis lost the `trained` record (a crash within AOF everysec): this process still knows the id.
    ledger.record(client, names, {messages[1].id: ledger.PRODUCED})
    _copy_on_stream(client, names, messages[1])
    [lost] = q.read(1, block_ms=100)
    assert journal.refuse_duplicates([lost]) == ([], [lost])
    assert ledger.outcome_of(client, names, messages[1].id) == ledger.TRAINED
    assert ledger.counts(client, names) == {ledger.PRODUCED: 0, ledger.TRAINED: 3, ledger.DROPPED: 0, ledger.DEAD: 0}
    assert client.xlen(names.scored) == 0 and int(client.xpending(names.scored, q.group)["pending"]) == 0
    assert ledger.duplicates(client, names) == 5


def _books(client: redis.Redis, names: Names) -> tuple[dict[str, int], dict[str, str | None]]:
    """The ledger's counts and each id's outcome, read from the ledger itself (no conservation arithmetic)."""
    outcomes = {k.decode(): v.decode() for k, v in client.hgetall(names.ledger).items()}
    return ledger.counts(client, names), outcomes  # type: ignore[return-value]


def test_a_failed_commit_marks_nothing_trained_and_a_restart_trains_the_rest(redis_url: str) -> None:
    """Issue 16, defect 1: a commit refused by the script must not record the batch `trained`.

    Reproduces: three entries read by learner-0, one XCLAIMed by learner-1 (a DDP rank taking a slow rank's
    entries), then learner-0 commits. Before the fix the script's NOTOWNED error did not abort the MULTI it
    shared with the ledger update, so the ledger said `trained: 3, produced: 0`, and the restarted learner's
    duplicate check acked and deleted its two entries as copies: nothing trained, books balanced.
    """
    client, names, q, messages = _setup(redis_url, 3, max_deliveries=5)
    batch = q.read(3, block_ms=100)
    journal = _journal(client, names, q)
    assert journal.refuse_duplicates(batch) == (batch, [])
    client.xclaim(names.scored, q.group, "learner-1", 0, [batch[2].entry_id])
    with pytest.raises(CommitError, match="NOTOWNED"):
        journal.commit(1, 1, batch)
    counts, outcomes = _books(client, names)
    assert counts[ledger.PRODUCED] == 3 and counts[ledger.TRAINED] == 0, counts
    assert outcomes == {m.id: ledger.PRODUCED for m in messages}
    assert client.xlen(journal.key) == 0 and client.xlen(names.scored) == 3

    # learner-0 restarts (a new process: it remembers nothing) and trains the two entries it still owns.
    restarted = LearnerQueue(client, names.scored, names=names, consumer="learner-0", expect=ScoredPrefix,
                             claim_idle_ms=60_000, max_deliveries=5)
    again = restarted.recover_own()
    assert [d.entry_id for d in again] == [d.entry_id for d in batch[:2]]
    journal0 = _journal(client, names, restarted)
    assert journal0.refuse_duplicates(again) == (again, [])  # not copies: their ids were never trained
    journal0.commit(1, 1, again)
    # learner-1 trains the entry it took.
    q1 = LearnerQueue(client, names.scored, names=names, consumer="learner-1", expect=ScoredPrefix,
                      claim_idle_ms=60_000, max_deliveries=5)
    taken = q1.recover_own()
    assert [d.message.id for d in taken] == [messages[2].id]
    journal1 = StepJournal(client, names, stream=q1.stream, group=q1.group, consumer=q1.consumer, rank=1,
                           max_bytes=q1.max_bytes)
    assert journal1.refuse_duplicates(taken) == (taken, [])
    journal1.commit(1, 1, taken)

    counts, outcomes = _books(client, names)
    assert outcomes == {m.id: ledger.TRAINED for m in messages}
    assert counts == {ledger.PRODUCED: 0, ledger.TRAINED: 3, ledger.DROPPED: 0, ledger.DEAD: 0}
    assert ledger.duplicates(client, names) == 0
    journaled = [f[b"entry"].decode() for k in (journal0.key, journal1.key) for _, f in client.xrange(k)]
    assert sorted(journaled) == sorted(d.entry_id for d in batch)  # each entry journaled once, by its owner
    assert client.xlen(names.scored) == 0 and int(client.xpending(names.scored, q.group)["pending"]) == 0


def _snapshot(client: redis.Redis, names: Names, journal: StepJournal, group: str) -> dict[str, object]:
    """Everything a commit may write: both streams, the pending list, and the ledger's three keys."""
    return {"scored": client.xrange(names.scored), "journal": client.xrange(journal.key),
            "pending": [(p["message_id"], p["consumer"], p["times_delivered"])
                        for p in client.xpending_range(names.scored, group, "-", "+", 100)],
            **{key: client.hgetall(key) for key in ledger.keys(names)}}


@pytest.mark.parametrize("reply", ["NOTOWNED", "MISSING", "NOPAYLOAD"])
def test_each_failure_reply_of_the_commit_script_writes_nothing(redis_url: str, reply: str) -> None:
    """Pins each error reply of `_COMMIT` (STYLE.md item 14): refused with its code, nothing written anywhere.

    The last entry of the batch is the bad one, so the script has already checked good entries when it
    refuses: a write made per entry before every check passed would show up here. Before the fix the ledger
    recorded the batch `trained` on each of these replies (the ledger keys changed).
    """
    client, names, q, _ = _setup(redis_url, 2)
    batch = q.read(2, block_ms=100)
    journal = _journal(client, names, q)
    if reply == "NOTOWNED":
        client.xclaim(names.scored, q.group, "learner-1", 0, [batch[-1].entry_id])
    elif reply == "MISSING":
        client.xdel(names.scored, batch[-1].entry_id)  # still pending for learner-0, gone from the stream
    else:  # an entry without the payload field, read by this consumer
        bare = _s_id(client.xadd(names.scored, {"other": b"x"}))
        client.xreadgroup(q.group, q.consumer, {names.scored: ">"}, count=1)
        batch[-1] = Delivery(bare, batch[-1].message, 1)
    before = _snapshot(client, names, journal, q.group)
    with pytest.raises(CommitError, match=reply):
        journal.commit(1, 1, batch)
    assert _snapshot(client, names, journal, q.group) == before
    assert ledger.counts(client, names)[ledger.TRAINED] == 0


def _s_id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_a_rank_that_autoclaims_a_stalled_ranks_entries_trains_them_once(redis_url: str) -> None:
    """Issue 16, item 6: a DDP rank takes a stalled rank's entries (XAUTOCLAIM) before that rank commits.

    Rank 0 reads four entries and stalls past `claim_idle_ms` (a frozen process: its keep-claimed thread
    stalls too); rank 1's next read takes them over and also reads the other two. Rank 0's commit is then
    refused and must record nothing; rank 1 trains all six. Books counted from independent witnesses, not
    from the ledger's own arithmetic: the ids the producer published, the messages journaled by each rank
    (what each trained), the dead-letter stream, and what is still queued or pending. Fails before the fix:
    the refused commit recorded rank 0's four ids `trained` while rank 1 still held them.
    """
    client, names, q0, messages = _setup(redis_url, 6, claim_idle_ms=100, max_deliveries=5)
    journal0 = _journal(client, names, q0)
    batch0 = q0.read(4, block_ms=100)
    assert journal0.refuse_duplicates(batch0) == (batch0, [])
    time.sleep(0.3)  # idle past claim_idle_ms
    q1 = LearnerQueue(client, names.scored, names=names, consumer="learner-1", expect=ScoredPrefix,
                      claim_idle_ms=100, max_deliveries=5)
    journal1 = StepJournal(client, names, stream=q1.stream, group=q1.group, consumer=q1.consumer, rank=1,
                           max_bytes=q1.max_bytes)
    held1: list[Delivery] = []
    deadline = time.monotonic() + 5
    while len(held1) < 6 and time.monotonic() < deadline:
        admitted, refused = journal1.refuse_duplicates(q1.read(6 - len(held1), block_ms=50))
        assert refused == []
        held1 += admitted
    assert {d.entry_id for d in batch0} <= {d.entry_id for d in held1} and len(held1) == 6

    with pytest.raises(CommitError, match="NOTOWNED"):
        journal0.commit(1, 1, batch0)
    assert ledger.counts(client, names)[ledger.TRAINED] == 0
    journal1.commit(1, 1, held1)
    assert LearnerQueue(client, names.scored, names=names, consumer="learner-0", expect=ScoredPrefix).recover_own() == []

    published = sorted(m.id for m in messages)
    trained = [m.id for rank in (0, 1) for js in StepJournal(client, names, stream=q0.stream, group=q0.group,
                                                             consumer=f"learner-{rank}", rank=rank,
                                                             max_bytes=q0.max_bytes).load(after_step=0)
               for m in js.messages]
    assert sorted(trained) == published  # each published id trained, once
    assert read_dead_letters(client, names) == [] and client.xlen(names.scored) == 0
    assert int(client.xpending(names.scored, q0.group)["pending"]) == 0
    assert {k.decode(): v.decode() for k, v in client.hgetall(names.ledger).items()} == dict.fromkeys(published, ledger.TRAINED)
    assert ledger.counts(client, names)[ledger.TRAINED] == len(published) and ledger.duplicates(client, names) == 0


def test_a_commit_whose_reply_is_lost_is_retried_to_the_same_step(redis_url: str) -> None:
    """A commit reply lost for real (a proxy closes the connection after Redis ran the script): the client's
    retry (`protocol/reconnect.py`) runs the script again, which finds the step at the journal's tail and
    returns it; the batch is journaled, acknowledged and recorded `trained` once."""
    client, names, q, messages = _setup(redis_url, 3)
    batch = q.read(3, block_ms=100)
    retry = RideOutRetry(ReconnectPolicy(base_s=0.05, cap_s=0.2, give_up_s=30), "proxied-redis", outages=Outages())
    with ReplyDropper.in_front_of(redis_url) as dropper:
        proxied = redis.Redis.from_url(dropper.url(), socket_timeout=10, retry=retry)
        journal = StepJournal(proxied, names, stream=q.stream, group=q.group, consumer=q.consumer, rank=0,
                              max_bytes=q.max_bytes)
        proxied.ping()
        dropper.armed.set()
        journal.commit(1, 1, batch)
        assert dropper.dropped == 1 and dropper.connections == 2, "the reply was not lost: the test proved nothing"
    assert [f[b"entry"].decode() for _, f in client.xrange(journal.key)] == [d.entry_id for d in batch]
    assert len(journal) == 3  # the ids the retry returned: this process knows what to forget at its checkpoint
    assert ledger.counts(client, names) == {ledger.PRODUCED: 0, ledger.TRAINED: 3, ledger.DROPPED: 0, ledger.DEAD: 0}
    assert client.xlen(names.scored) == 0 and {ledger.outcome_of(client, names, m.id) for m in messages} == {ledger.TRAINED}
