"""A learner killed with SIGKILL and restarted loses nothing and trains nothing twice.

Pins (the learner runs as `python -m opd.cli learner`, on real scored prefixes of the tiny models):
- after the kill, the restarted learner is at the last committed step: the newest checkpoint (step 3)
  plus the journaled step 4, with the version and the announced weights of before the kill (the replayed
  weights are bit-identical to the ones published before the kill);
- entries it had read but not trained are taken back at once by the same consumer (their delivery count
  goes to 2) although `transport.claim_idle_ms` is ten minutes, so no reclaim timeout was needed;
- at the end every message id is `trained` in the ledger, nothing is `produced` or pending, the stream
  and the journal are empty, and each id is in exactly one step of the final lineage;
- a learner that dies after the commit script of a step and before that step's lineage row (issue 16,
  item 6) loses nothing either: the replay writes the row, and independent books agree (below).
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
import redis
from learner_streams import (
    announcement,
    learner_command,
    learner_overrides,
    learner_step,
    lineage,
    pending_entries,
    publish,
    scored_messages,
    start,
    wait_for,
    wait_for_new_announcement,
)

from learner.checkpoint import latest_checkpoint, read_meta
from protocol import ledger
from protocol.names import Names
from protocol.streams import read_dead_letters

pytestmark = pytest.mark.integration

BATCH = 4


def _weights_sha(path: str) -> str:
    return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()


def test_sigkill_restart_resumes_at_the_last_committed_step(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    names = Names("restart")
    client = redis.Redis.from_url(redis_url)
    messages = scored_messages(tiny_assets, 6 * BATCH)
    workdir = tmp_path / "learner"
    overrides = [*learner_overrides(
        redis_url, names.namespace, tiny_assets, workdir, batch_size=BATCH, steps=6, checkpoint_every=3,
        max_staleness=10, keep_published=10, read_timeout_s=300, micro_batch_tokens=64,
    ), "transport.claim_idle_ms=600000"]
    cmd = learner_command(overrides)
    log_path = tmp_path / "learner.log"

    # First life: 4.5 batches available, so it trains 4 steps (checkpoint at 3) and holds 2 read entries.
    publish(client, names, messages[: 4 * BATCH + 2])
    proc = start(cmd, log_path)
    try:
        wait_for("step 4 with 2 entries read and held", lambda: learner_step(client, names) == 4
                 and len(pending_entries(client, names)) == 2, proc, log_path)
        before = announcement(client, names)
        assert before is not None and before.version == 4 and before.step == 4
        sha_before = _weights_sha(before.path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = latest_checkpoint(workdir / "checkpoints")
    assert ckpt is not None and read_meta(ckpt).step == 3
    assert client.xlen(names.key("learner:journal:0")) == BATCH  # step 4, journaled, not checkpointed
    assert all(p["consumer"] == b"learner-0" and p["times_delivered"] == 1 for p in pending_entries(client, names))

    # Second life: resumes at step 4 / v4 with the same weights, takes back the 2 held entries at once.
    proc = start(cmd, log_path)
    try:
        after = wait_for_new_announcement(client, names, before, "the restarted learner's announcement", proc, log_path)
        assert (after.version, after.step) == (4, 4)
        assert _weights_sha(after.path) == sha_before
        wait_for("the held entries taken back", lambda: [p["times_delivered"] for p in pending_entries(client, names)]
                 == [2, 2], proc, log_path)
        assert learner_step(client, names) == 4

        publish(client, names, messages[4 * BATCH + 2:])
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    log_text = log_path.read_text()
    assert "resumed from" in log_text and "step-000003" in log_text
    assert "replayed 1 journaled steps" in log_text
    final = announcement(client, names)
    assert final is not None and (final.version, final.step) == (6, 6)

    # Conservation and exactly-once.
    ids = {m.id for m in messages}
    assert {client.hget(names.ledger, i) for i in ids} == {ledger.TRAINED.encode()}
    counts = ledger.counts(client, names)
    assert counts[ledger.TRAINED] == len(ids) and counts[ledger.PRODUCED] == 0, counts
    assert client.xlen(names.scored) == 0 and pending_entries(client, names) == []
    assert client.xlen(names.key("learner:journal:0")) == 0
    steps = lineage(workdir / "trained_ids.jsonl")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    trained = [i for row in steps.values() for i in row["ids"]]  # type: ignore[attr-defined]
    assert sorted(trained) == sorted(ids)
    assert steps[4]["replayed"] is True


def test_a_learner_dead_between_commit_and_lineage_row_loses_nothing(redis_url: str, tiny_assets: Path,
                                                                     tmp_path: Path) -> None:
    """Issue 16, item 6: the learner dies after the commit script of step 1, before its lineage row.

    How, for real: its lineage file is a directory, so the append that follows the commit fails and the
    process exits with the error, without a checkpoint: the state a SIGKILL at that instant leaves (step 1
    journaled and `trained` in the ledger, in no lineage row). The restart replays step 1 (a `replayed`
    row) and trains the rest. Books from independent witnesses: the ids published, the lineage rows (each
    id in exactly one step), the journal, the dead-letter stream, what is queued or pending, and the ledger.
    Passes on the main of issue 16 too (a regression pin for the crash window, not a reproduction).
    """
    names = Names("commit-crash")
    client = redis.Redis.from_url(redis_url)
    messages = scored_messages(tiny_assets, 3 * BATCH)
    workdir = tmp_path / "learner"
    (workdir / "trained_ids.jsonl").mkdir(parents=True)
    cmd = learner_command([*learner_overrides(
        redis_url, names.namespace, tiny_assets, workdir, batch_size=BATCH, steps=3, checkpoint_every=10,
        max_staleness=10, read_timeout_s=300, micro_batch_tokens=64), "transport.claim_idle_ms=600000"])
    log_path = tmp_path / "learner.log"
    publish(client, names, messages)
    journal_key = names.key("learner:journal:0")

    proc = start(cmd, log_path)
    try:
        assert proc.wait(timeout=300) != 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "trained_ids.jsonl" in log_path.read_text()  # the failed lineage append is what stopped it
    journaled = [f[b"entry"] for _, f in client.xrange(journal_key)]
    assert len(journaled) == BATCH and {int(f[b"step"]) for _, f in client.xrange(journal_key)} == {1}
    assert ledger.counts(client, names)[ledger.TRAINED] == BATCH

    (workdir / "trained_ids.jsonl").rmdir()
    proc = start(cmd, log_path)
    try:
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = [json.loads(line) for line in (workdir / "trained_ids.jsonl").read_text().splitlines()]
    assert [(r["step"], r["replayed"]) for r in rows] == [(1, True), (2, False), (3, False)]
    published = sorted(m.id for m in messages)
    assert sorted(i for r in rows for i in r["ids"]) == published  # every id in exactly one step
    assert {k.decode(): v.decode() for k, v in client.hgetall(names.ledger).items()} == dict.fromkeys(published, ledger.TRAINED)
    assert ledger.counts(client, names)[ledger.TRAINED] == len(published) and ledger.duplicates(client, names) == 0
    assert read_dead_letters(client, names) == [] and client.xlen(names.scored) == 0
    assert pending_entries(client, names) == [] and client.xlen(journal_key) == 0
