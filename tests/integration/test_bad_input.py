"""Bad messages on the wire: each is dead-lettered with its reason, and the pipeline keeps training.

One teacher and one learner run as real processes (`opd teacher`, `opd learner`) on the session's real
redis-server, for the whole module. Each case writes raw bytes with `XADD` into the stream a consumer
reads (the rollout stream: the teacher; the scored stream: the learner), as a buggy or hostile writer
would, then publishes one good rollout the way an actor does (all cases are written at once, in order,
and the pipeline works through them). A case holds when the bad entry is in the dead-letter stream with a
reason naming what was wrong, the good rollout behind it is trained (the consumer kept going), and the
ledger records the bad message `dead` when it carried an id. The books test stops the roles and checks:
nothing still `produced`, every id with one outcome, each good one trained exactly once, no traceback.

Then the bad files: prompt files `opd up` must refuse before starting anything (exit 2, file and line
named), `teacher.topk` past the teacher's vocabulary, and prompts too long for the student's context
(left out by the actor and counted; none fitting is an error naming the keys).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from learner_streams import scored_messages
from roles import CONFIG, REPO, Pipeline, assert_conserved_and_trained_once, pipeline_overrides, wait_until

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

    def stream(self, which: str) -> str:
        return self.names.rollouts if which == "rollouts" else self.names.scored

    def good_rollout(self) -> str:
        """Publish the next good rollout as an actor does (ledger `produced` with it); its id."""
        scored = self.good[len(self.trained) % len(self.good)]
        fields = {f.name: getattr(scored, f.name) for f in dataclasses.fields(RolloutPrefix)}
        rollout = RolloutPrefix(**{**fields, "id": uuid.uuid4().hex})
        q = StreamQueue(self.client, self.names.rollouts, names=self.names, max_bytes=MAX_BYTES)
        assert q.publish(rollout, ledger_outcome=ledger.PRODUCED)
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
        entry_id = running.client.xadd(running.stream(case.stream), fields).decode()
        out[name] = Injected(entry_id, fields, running.good_rollout())
    wait_until("every good rollout sent after a bad message to be trained",
               lambda: all(outcome(running, i.good_id) == ledger.TRAINED for i in out.values()),
               running.pipeline, timeout_s=300)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_message_is_dead_lettered_and_the_pipeline_goes_on(running: Running, injected: dict[str, Injected],
                                                               name: str) -> None:
    case, sent = CASES[name], injected[name]
    assert outcome(running, sent.good_id) == ledger.TRAINED
    letters = [f for _e, f in running.client.xrange(running.names.dead) if f[b"entry"].decode() == sent.entry_id]
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
    entry_id = running.client.xadd(running.names.scored, entry(payload)).decode()
    good_id = running.good_rollout()
    wait_until("the good rollout after the bad copy", lambda: outcome(running, good_id) == ledger.TRAINED,
               running.pipeline, timeout_s=240)
    letters = [f for _e, f in running.client.xrange(running.names.dead) if f[b"entry"].decode() == entry_id]
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
    counts = assert_conserved_and_trained_once(running.client, running.names, running.workdir)
    assert counts[ledger.TRAINED] == len(running.trained)
    dead = {d.message_id for d in read_dead_letters(running.client, running.names, count=10_000) if d.message_id}
    dead -= set(running.trained)  # a bad copy of a trained id (above) keeps the id `trained`
    assert counts[ledger.DEAD] == len(dead)


# ----------------------------------------------------------------------------- prompt files


def up_args(tiny_assets: Path, tmp: Path, prompts: Path, *extra: str) -> list[str]:
    """`opd up` on the tiny models with `prompts`; it must stop before starting Redis or any role."""
    from opd.tiny import asset_paths

    paths = asset_paths(tiny_assets)
    sets = {"run.tiny_assets": "null", "run.warm_cache": "null", "run.workdir": tmp / "run",
            "actor.model_dir": paths.student_dir, "teacher.model_dir": paths.teacher_dir,
            "learner.model_dir": paths.student_dir, "learner.workdir": tmp / "learner",
            "teacher.cache_dir": tmp / "cache", "learner.eval.heldout_file": "''", "actor.prompts_file": prompts}
    return ["up", "--config", str(CONFIG), "--no-progress", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
            *extra]


def up_refuses(capsys: pytest.CaptureFixture[str], args: list[str], tmp: Path) -> str:
    """`opd up` (in this process: its signal handlers are restored) exits 2 with no role started; its stderr."""
    from opd.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not list((tmp / "run" / "logs").glob("*.log")), "a role was started"
    return err


@pytest.mark.parametrize(("content", "says"), [
    ("", ": no prompts found"),
    ("\n  \n", ": no prompts found"),
    ('{"prompt": "up a b:"}\n{"prompt": oops}\n', ":2: invalid JSON"),
    ('{"prompt": "up a b:"}\n\n["up a b:"]\n', ":3: expected a JSON object"),
    ('{"text": "up a b:"}\n', ":1: missing 'prompt'"),
], ids=["empty", "blank-lines", "invalid-json", "not-an-object", "no-prompt-key"])
def test_up_refuses_a_bad_prompt_file_before_starting_anything(tiny_assets: Path, tmp_path: Path, content: str,
                                                               says: str, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    err = up_refuses(capsys, up_args(tiny_assets, tmp_path, prompts), tmp_path)
    assert f"{prompts}{says}" in err, err


def test_up_refuses_teacher_topk_past_the_vocabulary(tiny_assets: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`teacher.topk` within its config bound (256) but past the tiny teacher's vocabulary: named at start."""
    from opd.tiny import asset_paths

    args = up_args(tiny_assets, tmp_path, asset_paths(tiny_assets).prompts_file, "--set", "teacher.topk=200")
    assert "teacher.topk=200 exceeds the vocabulary of teacher.model_dir" in up_refuses(capsys, args, tmp_path)


def make_actor(redis_server: str, tiny_assets: Path, prompts: Path) -> Any:
    from actors.actor import Actor
    from actors.config import ActorConfig
    from opd.tiny import asset_paths
    from protocol.config import TransportConfig

    cfg = ActorConfig(model_dir=str(asset_paths(tiny_assets).student_dir), prompts_file=str(prompts), max_new_tokens=8,
                      batch_size=6, admission_control=False, probe_fraction=0, engine={"kind": "hf", "device": "cpu"})
    names = Names(f"long-{uuid.uuid4().hex[:8]}")
    return Actor(cfg, TransportConfig(redis_url=redis_server, namespace=names.namespace), actor_id="actor-long")


def test_actor_skips_prompts_too_long_for_the_context(redis_server: str, tiny_assets: Path, tmp_path: Path) -> None:
    """A prompt with no room for max_new_tokens in the student's context is left out at start and counted; the
    actor samples the others (the engine would refuse it mid-run and stop the actor)."""
    from opd.tiny import MAX_POSITIONS
    from protocol.messages import decode

    prompts = tmp_path / "prompts.jsonl"
    texts = ["up a b:", "a " * MAX_POSITIONS, "down c b a:"]
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in texts) + "\n")
    actor = make_actor(redis_server, tiny_assets, prompts)
    try:
        assert actor.registry.get_sample_value("opd_actor_prompts_skipped_total", {"reason": "too_long"}) == 1
        assert actor.step() == 6
        rollouts = [decode(fields[PAYLOAD]) for _e, fields in actor.client.xrange(actor.names.rollouts)]
        assert {r.prompt_index for r in rollouts} == {0, 2}, "only the prompts that fit are sampled"  # type: ignore[union-attr]
    finally:
        keys = actor.client.keys(f"{actor.names.namespace}:*")
        if keys:
            actor.client.delete(*keys)
        actor.client.close()


def test_actor_refuses_a_prompt_file_with_no_prompt_that_fits(redis_server: str, tiny_assets: Path,
                                                              tmp_path: Path) -> None:
    from opd.tiny import MAX_POSITIONS
    from protocol.errors import InputError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a " * MAX_POSITIONS}) + "\n")
    with pytest.raises(InputError, match=rf"{prompts}: no prompt fits the model's context of {MAX_POSITIONS} tokens "
                       r"with actor\.max_new_tokens=8"):
        make_actor(redis_server, tiny_assets, prompts)


def test_opd_actor_names_the_bad_line_of_its_prompt_file(redis_server: str, tiny_assets: Path, tmp_path: Path) -> None:
    """Through the command line: exit 2, the file and line named, no traceback."""
    from opd.tiny import asset_paths

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "up a b:"}\n{"prompt": 3}\n')
    out = subprocess.run(
        [sys.executable, "-m", "opd.cli", "actor", "--config", str(CONFIG), "--set", f"transport.redis_url={redis_server}",
         "--set", f"transport.namespace=badline-{uuid.uuid4().hex[:8]}", "--set",
         f"actor.model_dir={asset_paths(tiny_assets).student_dir}", "--set", f"actor.prompts_file={prompts}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"{prompts}:2: 'prompt' must be a string, got int" in out.stderr
    assert "Traceback" not in out.stderr
