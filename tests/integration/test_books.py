"""The fault suite's conservation check can fail (issue 16, defect 4).

The check (`tests/integration/roles.py` `assert_conserved_and_trained_once`) balances witnesses that do not
read one another: what the producers say they published (`<ns>:produced_by`, counted by each actor in its
publish script), the learner's lineage, its drop counter, the dead-letter stream and the streams' lengths.
Pinned here with real processes (actor, teacher, learner) on a real Redis: a message deleted behind the
pipeline's back, its stream entry and its ledger record both gone, leaves the ledger's own books balanced
(what the check compared before, so it said "0 lost") and fails the independent books, naming the loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from roles import Pipeline, assert_conserved_and_trained_once, pipeline_overrides, read_books, wait_until

from protocol import ledger
from protocol.messages import RolloutPrefix, decode
from protocol.names import Names

pytestmark = pytest.mark.integration


def _erase(client: redis.Redis, names: Names) -> str:
    """Delete the oldest rollout entry and every trace of it in the ledger, atomically; its message id."""
    [(entry_id, fields)] = client.xrange(names.rollouts, count=1)
    message_id = decode(fields[b"m"], expect=RolloutPrefix).id
    pipe = client.pipeline(transaction=True)
    pipe.xdel(names.rollouts, entry_id)
    pipe.hdel(names.ledger, message_id)
    pipe.hincrby(names.key("outcomes"), ledger.PRODUCED, -1)
    pipe.execute()
    return message_id


def test_a_message_deleted_behind_the_pipelines_back_fails_the_books(redis_url: str, tiny_assets: Path,
                                                                     tmp_path: Path) -> None:
    """Reproduces issue 16 defect 4: with the ledger as its only witness, the check computed `lost` from the
    ledger it had just found balanced, so a message that vanished with its record was "0 lost"."""
    names = Names("xdel")
    client = redis.Redis.from_url(redis_url)
    overrides = pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **{"learner.steps": 2})
    pipe = Pipeline()
    try:
        pipe.start("learner", "learner-0", overrides, tmp_path)
        pipe.start("actor", "actor-0", overrides, tmp_path)
        wait_until("rollouts on the stream (no teacher yet: none delivered)",
                   lambda: client.xlen(names.rollouts) >= 2, pipe)
        gone = _erase(client, names)
        pipe.start("teacher", "teacher-0", overrides, tmp_path)
        learner = pipe.roles["learner-0"]
        wait_until("the learner finishing", lambda: learner.proc.poll() is not None, pipe, timeout_s=600)
        assert learner.proc.returncode == 0, learner.log()[-4000:]
    finally:
        pipe.stop_all()

    audit = ledger.audit(client, names)  # the ledger alone balances: every id it knows has one outcome
    assert audit.conserved and audit.outcomes[ledger.PRODUCED] == 0, audit
    assert ledger.outcome_of(client, names, gone) is None
    books = read_books(client, names, tmp_path / "learner")
    assert books.lost == 1 and books.by_producer["actor-0"] == audit.total + 1, str(books)
    with pytest.raises(AssertionError, match=r"the books do not balance: .* lost 1$"):
        assert_conserved_and_trained_once(client, names, tmp_path / "learner")
