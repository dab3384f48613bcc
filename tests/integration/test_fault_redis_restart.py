"""Every role rides out a Redis crash: SIGKILL of redis-server mid-run, restart from its AOF (issue 11).

The roles are real processes (`opd actor|teacher|learner`) on a redis-server of the test's own (AOF on,
fsync everysec). Mid-run the server is killed with SIGKILL and, 30 seconds later (every role meets a
refused connection for that long), started again on the same port from the same data dir.

Pins:
- no role dies: the learner finishes its steps and exits 0, the teacher and the actor stop cleanly
  when told to (exit 0);
- each role logs exactly one line when it finds Redis unreachable and one when it is back, and no
  traceback; the teacher's /metrics counts one outage (`opd_redis_outages_total`) and its seconds;
- the run's books close: the ledger conserves (produced = trained + dropped + dead, nothing left in
  flight), and no prefix is trained twice (each trained id once in the learner's lineage);
- Redis restarted from an older AOF (the last writes lost, as a power loss within `everysec` would):
  the learner sees its journal lost a trained step and checkpoints at once, so a later SIGKILL and
  restart resumes from that checkpoint rather than refusing a journal with a gap;
- Redis gone for longer than `transport.reconnect_give_up_s`: the learner stops with exit code 1 and
  one error line naming the key, no traceback.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from pathlib import Path

import pytest
import redis
from conftest import free_port
from learner_streams import (
    learner_command,
    learner_overrides,
    learner_step,
    publish,
    scored_messages,
    start,
    wait_for,
)
from roles import (
    Pipeline,
    RedisServer,
    assert_conserved_and_trained_once,
    metric,
    pipeline_overrides,
    wait_until,
)

from learner.checkpoint import latest_checkpoint, read_meta
from protocol import ledger
from protocol.names import Names
from protocol.state import LearnerState, read_state

pytestmark = pytest.mark.integration

OUTAGE_S = 30.0  # how long Redis stays down (issue 11: "unreachable for 30 s"): the fault, not a wait for anything
STEPS = 16
BATCH = 4


def _step(client: redis.Redis, names: Names) -> int:
    with contextlib.suppress(redis.RedisError):
        state = read_state(client, names)
        if isinstance(state, LearnerState):
            return state.step
    return -1


def test_every_role_rides_out_a_redis_crash(tiny_assets: Path, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", free_port())
    server.start()
    names = Names("redisfault")
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    overrides = pipeline_overrides(server.url, names, tiny_assets, tmp_path, **{
        "learner.steps": STEPS, "learner.max_staleness": 4, "transport.claim_idle_ms": 3000,
        "transport.reconnect_base_s": 0.05, "transport.reconnect_cap_s": 0.5})
    pipe = Pipeline()
    try:
        pipe.start("learner", "learner-0", overrides, tmp_path)
        pipe.start("teacher", "teacher-0", overrides, tmp_path)
        pipe.start("actor", "actor-0", overrides, tmp_path)
        wait_until("a few learner steps", lambda: _step(client, names) >= 3, pipe)
        assert _step(client, names) < STEPS, "the run ended before the fault: raise STEPS"

        server.kill()
        time.sleep(OUTAGE_S)
        server.start()

        learner = pipe.roles["learner-0"]
        wait_until("the learner finishing", lambda: learner.proc.poll() is not None, pipe, timeout_s=600)
        assert learner.proc.returncode == 0, learner.log()[-4000:]
        teacher = pipe.roles["teacher-0"]  # still serving (the actor stopped with the drain)
        assert metric(client, names, "teacher-0", "opd_redis_outages_total") == 1.0, teacher.log()[-3000:]
        assert (metric(client, names, "teacher-0", "opd_redis_outage_seconds_total") or 0) > 0
    finally:
        pipe.stop_all()
        try:
            counts = assert_conserved_and_trained_once(client, names, tmp_path / "learner")
        finally:
            server.stop()

    for role in pipe.roles.values():
        text = role.log()
        assert role.proc.returncode == 0, f"{role.name} exited with {role.proc.returncode}:\n{text[-3000:]}"
        assert "Traceback" not in text, f"{role.name}:\n{text[-3000:]}"
        assert text.count("unreachable (") == 1, f"{role.name}:\n{text[-3000:]}"
        assert text.count("reachable again after") == 1, f"{role.name}:\n{text[-3000:]}"
    assert counts[ledger.TRAINED] >= STEPS * 4


def _step_or_down(client: redis.Redis, names: Names) -> int:
    with contextlib.suppress(redis.RedisError):
        return learner_step(client, names)
    return -1


def test_learner_checkpoints_when_redis_comes_back_without_its_journal(tiny_assets: Path, tmp_path: Path) -> None:
    """Redis restarted from an older AOF (what a power loss within `everysec` leaves): the learner notices its
    journal lost a step it trained, checkpoints at once, and a later SIGKILL + restart resumes from there
    instead of refusing a journal with a gap."""
    server = RedisServer(tmp_path / "redis", free_port())
    server.start()
    names = Names("journalloss")
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    messages = scored_messages(tiny_assets, 6 * BATCH)
    batches = [messages[i * BATCH:(i + 1) * BATCH] for i in range(6)]
    workdir = tmp_path / "learner"
    overrides = [*learner_overrides(server.url, names.namespace, tiny_assets, workdir, batch_size=BATCH, steps=6,
                                    checkpoint_every=1000, max_staleness=100, read_timeout_s=300, micro_batch_tokens=64),
                 "transport.reconnect_base_s=0.05", "transport.reconnect_cap_s=0.5"]
    cmd = learner_command(overrides)
    log_path = tmp_path / "learner.log"
    aof, snapshot = server.data_dir / "appendonlydir", tmp_path / "aof-at-step-2"
    proc = start(cmd, log_path)
    try:
        publish(client, names, batches[0] + batches[1])
        wait_for("step 2", lambda: _step_or_down(client, names) == 2, proc, log_path)
        shutil.copytree(aof, snapshot)  # what the disk holds; everything after it is "lost in the crash"
        publish(client, names, batches[2])
        wait_for("step 3", lambda: _step_or_down(client, names) == 3, proc, log_path)
        server.kill()
        shutil.rmtree(aof)
        shutil.copytree(snapshot, aof)
        server.start()
        assert client.xlen(names.key("learner:journal:0")) == 2 * BATCH  # step 3's journal entries are gone
        publish(client, names, batches[3])
        wait_for("the checkpoint after the loss", lambda: (latest_checkpoint(workdir / "checkpoints") is not None),
                 proc, log_path)
        ckpt = latest_checkpoint(workdir / "checkpoints")
        assert ckpt is not None and read_meta(ckpt).step == 4
        wait_for("the journal forgotten", lambda: client.xlen(names.key("learner:journal:0")) == 0, proc, log_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

        proc = start(cmd, log_path)  # without the checkpoint: "holds steps [1, 2, 4] ... different runs"
        publish(client, names, batches[4] + batches[5])
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    text = log_path.read_text()
    assert "without some of this learner's journaled steps" in text
    assert "resumed from" in text and "step-000004" in text
    assert "Traceback" not in text


def test_a_role_gives_up_after_reconnect_give_up_s_with_one_clear_line(tiny_assets: Path, tmp_path: Path) -> None:
    """Redis gone for good: the learner (two threads on Redis) stops with one error line naming the key."""
    server = RedisServer(tmp_path / "redis", free_port())
    server.start()
    names = Names("giveup")
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    overrides = [*learner_overrides(server.url, names.namespace, tiny_assets, tmp_path / "learner", batch_size=BATCH,
                                    steps=2, read_timeout_s=300),
                 "transport.reconnect_base_s=0.05", "transport.reconnect_cap_s=0.2", "transport.reconnect_give_up_s=2"]
    log_path = tmp_path / "learner.log"
    proc = start(learner_command(overrides), log_path)
    try:
        wait_for("the learner's state", lambda: _step_or_down(client, names) == 0, proc, log_path)
        server.kill()
        assert proc.wait(timeout=120) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    text = log_path.read_text()
    assert "transport.reconnect_give_up_s" in text and "opd learner: error:" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
