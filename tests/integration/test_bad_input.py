"""Bad messages on the wire: each is dead-lettered with its reason, and the pipeline keeps training.

One teacher and one learner run as real processes (`opd teacher`, `opd learner`) on the session's real
redis-server, for the whole module. Each case writes raw bytes with `XADD` into the stream a consumer
reads (the rollout stream: the teacher; the scored stream: the learner), as a buggy or hostile writer
would, then publishes one good rollout the way an actor does (all cases are written at once, in order,
and the pipeline works through them). A case holds when the bad entry is in the dead-letter stream with a
reason naming what was wrong, the good rollout behind it is trained (the consumer kept going), and the
ledger records the bad message `dead` when it carried an id. The books test stops the roles and checks:
nothing still `produced`, every id with one outcome, each good one trained exactly once, no traceback.

Bad prompt files and model-dependent settings: tests/integration/test_bad_prompts.py.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from learner_streams import scored_messages
from roles import Pipeline, assert_conserved_and_trained_once, pipeline_overrides, wait_until

from protocol import ledger
from protocol.messages import RolloutPrefix, ScoredPrefix, encode
from protocol.names import Names
from protocol.streams import PAYLOAD, StreamQueue, read_dead_letters

MAX_BYTES = 65_536  # transport.max_message_bytes of this pipeline: an oversized message is cheap to make
TOPK = 4


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad entry: where it goes, how it is made from a good message, what its dead letter must say."""

    stream: str  # "rollouts" (the teacher reads it) or "scored" (the learner reads it)
    make: Callable[[Any, int], dict[bytes, bytes]]  # (a good message of that stream, vocab size) -> entry fields
    reason: str  # a substring of the dead letter's reason
    has_id: bool = True  # the bad message carries a readable id: the ledger records it `dead`


def wire(message: Any) -> dict[str, Any]:
    """A good message as the decoded msgpack map a writer sends, with a fresh id (each case its own)."""
    payload = msgpack.unpackb(encode(message), raw=False)
    payload["id"] = uuid.uuid4().hex
    return payload


def array(values: Any, dtype: str) -> dict[str, Any]:
    arr = np.asarray(values).astype(np.dtype(dtype))
    return {"dtype": np.dtype(dtype).str, "shape": list(arr.shape), "data": arr.tobytes()}


def entry(payload: dict[str, Any]) -> dict[bytes, bytes]:
    return {PAYLOAD: msgpack.packb(payload, use_bin_type=True)}


def changed(**fields: Callable[[dict[str, Any], int], Any]) -> Callable[[Any, int], dict[bytes, bytes]]:
    """A good message with some fields replaced: `name=lambda payload, vocab: new wire value`."""
    def make(message: Any, vocab: int) -> dict[bytes, bytes]:
        payload = wire(message)
        for name, value in fields.items():
            payload[name] = value(payload, vocab)
        return entry(payload)
    return make


def ids_of(payload: dict[str, Any], name: str) -> np.ndarray:
    a = payload[name]
    return np.frombuffer(a["data"], dtype=np.dtype(a["dtype"])).reshape(a["shape"])


def replace_id(name: str, value: Callable[[int], int], at: int = 0) -> Callable[[dict[str, Any], int], Any]:
    """The array `name` with its element `at` (flat index) set to `value(vocab)`."""
    def new(payload: dict[str, Any], vocab: int) -> Any:
        arr = ids_of(payload, name).copy()
        arr.flat[at] = value(vocab)
        return array(arr, "<i4")
    return new


def oversized(message: Any, vocab: int) -> dict[bytes, bytes]:
    payload = wire(message)
    payload["prompt_ids_P"] = array(np.ones(MAX_BYTES // 4 + 16), "<i4")  # the map is already over the limit
    return entry(payload)


def scored(rollout: RolloutPrefix) -> ScoredPrefix:
    """A valid scored message made of a rollout (k = 0): the right schema on the wrong stream."""
    R = len(rollout.response_ids_R)
    return ScoredPrefix.from_rollout(rollout, teacher_logprobs_R=np.full(R, -1.0, np.float32),
                                     topk_ids_RK=np.zeros((R, 0), np.int32), topk_logprobs_RK=np.zeros((R, 0), np.float32))


def not_msgpack(_m: Any, _v: int) -> dict[bytes, bytes]:
    return {PAYLOAD: b"\xc1 this is not msgpack \xff"}


def foreign_map(_m: Any, _v: int) -> dict[bytes, bytes]:
    return entry({"hello": "world", "tokens": [1, 2, 3]})


CASES: dict[str, Case] = {
    # the rollout stream, read by the teacher
    "rollout-not-msgpack": Case("rollouts", not_msgpack, "not valid msgpack", has_id=False),
    "rollout-foreign-map": Case("rollouts", foreign_map, "unknown message kind", has_id=False),
    "rollout-no-payload-field": Case("rollouts", lambda _m, _v: {b"x": b"1"}, "entry has no 'm' field", has_id=False),
    "rollout-schema-v1": Case("rollouts", changed(v=lambda p, v: 1), "schema version 1 is not supported"),
    "rollout-schema-v99": Case("rollouts", changed(v=lambda p, v: 99), "schema version 99 is not supported"),
    "rollout-float-token-ids": Case("rollouts", changed(
        response_ids_R=lambda p, v: array(ids_of(p, "response_ids_R"), "<f4")), "response_ids_R: dtype <f4"),
    "rollout-int8-logprobs": Case("rollouts", changed(
        behaviour_logprobs_R=lambda p, v: array(np.zeros(len(ids_of(p, "response_ids_R"))), "|i1")),
        "behaviour_logprobs_R.dtype"),
    "rollout-logprobs-length": Case("rollouts", changed(
        behaviour_logprobs_R=lambda p, v: array(np.zeros(len(ids_of(p, "response_ids_R")) + 1), "<f4")),
        "behaviour_logprobs_R: length"),
    "rollout-2d-token-ids": Case("rollouts", changed(
        prompt_ids_P=lambda p, v: array(ids_of(p, "prompt_ids_P")[None, :], "<i4")), "prompt_ids_P: expected 1 dim"),
    "rollout-bytes-do-not-fit-shape": Case("rollouts", changed(
        response_ids_R=lambda p, v: {**p["response_ids_R"], "shape": [len(ids_of(p, "response_ids_R")) + 3]}),
        "response_ids_R.data"),
    "rollout-negative-token-id": Case("rollouts", changed(response_ids_R=replace_id("response_ids_R", lambda v: -1)),
                                      "response_ids_R: negative token id"),
    "rollout-token-id-at-vocab": Case("rollouts", changed(response_ids_R=replace_id("response_ids_R", lambda v: v)),
                                      "response_ids_R: token id"),
    "rollout-prompt-id-past-vocab": Case("rollouts", changed(prompt_ids_P=replace_id("prompt_ids_P", lambda v: 10 * v)),
                                         "prompt_ids_P: token id"),
    "rollout-oversized": Case("rollouts", oversized, f"exceeds the limit of {MAX_BYTES}"),
    "rollout-scored-kind": Case("rollouts", lambda m, v: entry(wire(scored(m))), "expected 'rollout' on this stream"),
    # the scored stream, read by the learner
    "scored-not-msgpack": Case("scored", not_msgpack, "not valid msgpack", has_id=False),
    "scored-schema-v1": Case("scored", changed(v=lambda p, v: 1), "schema version 1 is not supported"),
    "scored-float64-teacher-logprobs": Case("scored", changed(
        teacher_logprobs_R=lambda p, v: array(ids_of(p, "teacher_logprobs_R"), "<f8")), "teacher_logprobs_R: dtype <f8"),
    "scored-topk-rows": Case("scored", changed(
        topk_ids_RK=lambda p, v: array(ids_of(p, "topk_ids_RK")[1:], "<i4"),
        topk_logprobs_RK=lambda p, v: array(ids_of(p, "topk_logprobs_RK")[1:], "<f4")), "topk_ids_RK: shapes"),
    "scored-topk-ids-vs-logprobs": Case("scored", changed(
        topk_ids_RK=lambda p, v: array(ids_of(p, "topk_ids_RK")[:, 1:], "<i4")), "topk_ids_RK: shapes"),
    "scored-topk-id-at-vocab": Case("scored", changed(topk_ids_RK=replace_id("topk_ids_RK", lambda v: v, at=1)),
                                    "topk_ids_RK: token id"),
    "scored-negative-topk-id": Case("scored", changed(topk_ids_RK=replace_id("topk_ids_RK", lambda v: -5, at=1)),
                                    "topk_ids_RK: negative token id"),
    "scored-response-id-past-vocab": Case("scored", changed(
        response_ids_R=replace_id("response_ids_R", lambda v: v + 1000)), "response_ids_R: token id"),
    "scored-nan-topk-logprob": Case("scored", changed(
        topk_logprobs_RK=lambda p, v: array(np.where(np.arange(ids_of(p, "topk_logprobs_RK").size).reshape(
            ids_of(p, "topk_logprobs_RK").shape) == 0, np.nan, ids_of(p, "topk_logprobs_RK")), "<f4")),
        "topk_logprobs_RK: NaN"),
    "scored-oversized": Case("scored", oversized, f"exceeds the limit of {MAX_BYTES}"),
    "scored-rollout-kind": Case("scored", lambda m, v: entry(wire(RolloutPrefix(**{
        f.name: getattr(m, f.name) for f in dataclasses.fields(RolloutPrefix)}))), "expected 'scored' on this stream"),
}


@dataclasses.dataclass
class Running:
    client: redis.Redis
    names: Names
    pipeline: Pipeline
    good: list[ScoredPrefix]  # real scored samples of the tiny models; their rollout halves feed the teacher
    vocab: int
    workdir: Path
    trained: list[str] = dataclasses.field(default_factory=list)  # ids of the good rollouts sent so far
    written: int = 0  # bad entries written by hand (raw XADD, no producer count): part of what the books balance

    def stream(self, which: str) -> str:
        return self.names.rollouts if which == "rollouts" else self.names.scored

    def write(self, stream: str, fields: dict[bytes, bytes]) -> str:
        """XADD a bad entry as a buggy or hostile writer would, and count it for the books; its entry id."""
        self.written += 1
        return self.client.xadd(stream, fields).decode()

    def good_rollout(self) -> str:
        """Publish the next good rollout as an actor does (ledger `produced` with it); its id."""
        scored = self.good[len(self.trained) % len(self.good)]
        fields = {f.name: getattr(scored, f.name) for f in dataclasses.fields(RolloutPrefix)}
        rollout = RolloutPrefix(**{**fields, "id": uuid.uuid4().hex})
        q = StreamQueue(self.client, self.names.rollouts, names=self.names, max_bytes=MAX_BYTES)
        assert q.publish(rollout, ledger_outcome=ledger.PRODUCED, producer="good-writer")
        self.trained.append(rollout.id)
        return rollout.id


@pytest.fixture(scope="module")
def running(redis_server: str, tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    from transformers import AutoConfig

    from opd.tiny import asset_paths

    tmp = tmp_path_factory.mktemp("bad-input")
    names = Names(f"bad-{uuid.uuid4().hex[:8]}")
    client = redis.Redis.from_url(redis_server)
    overrides = pipeline_overrides(
        redis_server, names, tiny_assets, tmp, **{
            "transport.max_message_bytes": MAX_BYTES, "teacher.topk": TOPK, "teacher.batch_size": 1,
            "learner.batch_size": 1, "learner.steps": 10_000, "learner.max_staleness": 10_000,
            "learner.publish_every": 1000, "transport.claim_idle_ms": 600_000})
    pipeline = Pipeline()
    logs = tmp / "logs"
    logs.mkdir()
    vocab = int(AutoConfig.from_pretrained(asset_paths(tiny_assets).student_dir).vocab_size)
    run = Running(client, names, pipeline, scored_messages(tiny_assets, 4, topk=TOPK), vocab, tmp / "learner")
    try:
        pipeline.start("teacher", "teacher-0", overrides, logs)
        pipeline.start("learner", "learner", overrides, logs)
        yield run
    finally:
        pipeline.stop_all()
        client.close()


def outcome(run: Running, message_id: str) -> str | None:
    value = run.client.hget(run.names.ledger, message_id)
    return value.decode() if value is not None else None


@dataclasses.dataclass(frozen=True)
class Injected:
    entry_id: str  # the bad entry, in the stream its case names
    fields: dict[bytes, bytes]
    good_id: str  # the good rollout published right after it


@pytest.fixture(scope="module")
def injected(running: Running) -> dict[str, Injected]:
    """Every case's bad entry, each followed by a good rollout, all written at once; returns when every good
    rollout is trained (one wait for all: the pipeline works through them in order, as it would in a run)."""
    out: dict[str, Injected] = {}
    for name, case in CASES.items():
        template = running.good[0]
        message = template if case.stream == "scored" else RolloutPrefix(**{
            f.name: getattr(template, f.name) for f in dataclasses.fields(RolloutPrefix)})
        fields = case.make(message, running.vocab)
        entry_id = running.write(running.stream(case.stream), fields)
        out[name] = Injected(entry_id, fields, running.good_rollout())
    wait_until("every good rollout sent after a bad message to be trained",
               lambda: all(outcome(running, i.good_id) == ledger.TRAINED for i in out.values()),
               running.pipeline, timeout_s=300)
    return out


def dead_letters_of(running: Running, stream: str, entry_id: str) -> list[dict[bytes, bytes]]:
    """The dead letters of one entry: entry ids are per stream (milliseconds-sequence), so two streams written
    in the same millisecond can share one; the stream tells them apart."""
    return [f for _e, f in running.client.xrange(running.names.dead)
            if f[b"entry"].decode() == entry_id and f[b"stream"].decode() == running.stream(stream)]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_message_is_dead_lettered_and_the_pipeline_goes_on(running: Running, injected: dict[str, Injected],
                                                               name: str) -> None:
    case, sent = CASES[name], injected[name]
    assert outcome(running, sent.good_id) == ledger.TRAINED
    letters = dead_letters_of(running, case.stream, sent.entry_id)
    assert len(letters) == 1, f"{name}: entry {sent.entry_id} was not dead-lettered once: {letters}"
    letter = letters[0]
    reason = letter[b"reason"].decode()
    assert letter[b"stream"].decode() == running.stream(case.stream)
    assert case.reason in reason, f"{name}: reason {reason!r} does not say {case.reason!r}"
    assert letter[b"m"] == sent.fields.get(PAYLOAD, b""), "the dead letter keeps the bytes as received"
    message_id = letter[b"id"].decode()
    if case.has_id:
        assert message_id and outcome(running, message_id) == ledger.DEAD
    else:
        assert message_id == ""


def test_a_bad_copy_of_a_trained_id_leaves_its_outcome_alone(running: Running) -> None:
    """A malformed entry carrying the id of a sample already trained (a corrupted copy) is dead-lettered under
    that id, but the id stays `trained`: the ledger counts each id's one outcome, and the copy is not one."""
    first = running.trained[0] if running.trained else running.good_rollout()
    wait_until("a trained id", lambda: outcome(running, first) == ledger.TRAINED, running.pipeline, timeout_s=240)
    payload = wire(running.good[0])
    payload.update(id=first, v=99)
    entry_id = running.write(running.names.scored, entry(payload))
    good_id = running.good_rollout()
    wait_until("the good rollout after the bad copy", lambda: outcome(running, good_id) == ledger.TRAINED,
               running.pipeline, timeout_s=240)
    letters = dead_letters_of(running, "scored", entry_id)
    assert len(letters) == 1 and letters[0][b"id"].decode() == first
    assert outcome(running, first) == ledger.TRAINED


def test_books_balance_after_every_bad_message(running: Running) -> None:
    """Roles stopped: nothing left `produced`, each good rollout trained once, every dead letter accounted for."""
    last = running.good_rollout()
    wait_until("the last good rollout to be trained", lambda: outcome(running, last) == ledger.TRAINED,
               running.pipeline, timeout_s=240)
    running.pipeline.stop_all()
    for role in running.pipeline.roles.values():
        assert role.proc.returncode == 0, f"{role.name} exited with {role.proc.returncode}:\n{role.log()[-3000:]}"
        assert "Traceback" not in role.log(), f"{role.name} logged a traceback:\n{role.log()[-3000:]}"
    counts = assert_conserved_and_trained_once(running.client, running.names, running.workdir,
                                               written=running.written)
    assert counts[ledger.TRAINED] == len(running.trained)
    dead = {d.message_id for d in read_dead_letters(running.client, running.names, count=10_000) if d.message_id}
    dead -= set(running.trained)  # a bad copy of a trained id (above) keeps the id `trained`
    assert counts[ledger.DEAD] == len(dead)
