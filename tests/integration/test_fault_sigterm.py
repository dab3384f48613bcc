"""SIGTERM (and Ctrl-C) stop every role, and `opd up` itself, cleanly: drained, in order, nothing lost (issue 11).

The roles are real processes (`opd actor|teacher|learner`, and `opd up` with its private redis-server); the
signals are real. Pins:
- each role, SIGTERMed mid-run, exits 0 within `transport.stop_timeout_s` (checked with a wide margin, never
  a tight timing), logs one stop line and no traceback, and leaves nothing of its own unsettled: a teacher
  holds no entry of the rollouts stream, an actor is out of the registry the draining learner waits on;
- the learner checkpoints what it trained; restarted, it resumes at that step and policy version (its log
  says so, and its next steps continue the lineage without a gap or a repeat);
- the run's books close afterwards: every produced prefix trained exactly once, dropped or dead-lettered;
- a drain that outlasts `transport.stop_timeout_s` exits anyway (code 0) and says what it left pending;
  a restart takes those entries back and trains each once;
- `opd up` on SIGTERM or SIGINT stops actors, then teachers, then the learner, then its Redis (the log's
  order), prints the final table and the summary, exits 128 + signal, leaves no process behind, and no
  role's log shows a Redis connection error or a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from learner_streams import (
    learner_command,
    learner_overrides,
    publish,
    scored_messages,
    start,
    wait_for,
)
from roles import Pipeline, Role, assert_conserved_and_trained_once, metric, pipeline_overrides, wait_until

from learner.checkpoint import latest_checkpoint, read_meta
from protocol import ledger
from protocol.names import Names
from protocol.state import LearnerState, read_state

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 60.0  # transport.stop_timeout_s of these runs: a clean drain takes a fraction of it
MARGIN_S = 120.0  # what a loaded machine may add on top (interpreter start-up is not the role's drain)
STEPS = 14
BATCH = 4


def _processes_mentioning(marker: str) -> list[str]:
    """Live processes whose command line names `marker` (the run's work dir: roles and redis-server alike)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text and cmdline.parent.name != str(os.getpid()):
            found.append(f"{cmdline.parent.name}: {text[:200]}")
    return found


def _state(client: redis.Redis, names: Names) -> LearnerState | None:
    state = read_state(client, names)
    return state if isinstance(state, LearnerState) else None


def _step(client: redis.Redis, names: Names) -> int:
    state = _state(client, names)
    return state.step if state is not None else -1


def _sigterm(role: Role) -> int:
    """SIGTERM, then the exit code: within the bound (plus a wide margin for a loaded machine)."""
    role.proc.send_signal(signal.SIGTERM)
    try:
        return role.proc.wait(timeout=STOP_TIMEOUT_S + MARGIN_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{role.name} did not exit after SIGTERM:\n{role.log()[-3000:]}") from None


def _held_by(client: redis.Redis, stream: str, group: str, consumer: str) -> int:
    return len(client.xpending_range(stream, group, "-", "+", 1000, consumername=consumer))


def _assert_clean_stop(role: Role, code: int, stopped_line: str) -> None:
    text = role.log()
    assert code == 0, f"{role.name} exited with {code}:\n{text[-3000:]}"
    assert text.count("SIGTERM: stopping") == 1 and stopped_line in text, text[-3000:]
    assert "Traceback" not in text and "exiting without finishing" not in text, text[-3000:]


def test_sigterm_each_role_mid_run_loses_nothing(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    names = Names("sigterm")
    client = redis.Redis.from_url(redis_url)
    overrides = pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **{
        "learner.steps": STEPS, "learner.max_staleness": 4, "transport.stop_timeout_s": STOP_TIMEOUT_S,
        "transport.claim_idle_ms": 3000})
    pipe = Pipeline()
    try:
        pipe.start("learner", "learner-0", overrides, tmp_path)
        teacher = pipe.start("teacher", "teacher-0", overrides, tmp_path)
        actor = pipe.start("actor", "actor-0", overrides, tmp_path)
        wait_until("teacher-0 scoring", lambda: (metric(client, names, "teacher-0", "opd_teacher_prefixes_total")
                                                 or 0) > 0, pipe)
        _assert_clean_stop(teacher, _sigterm(teacher), "teacher-0: stopped:")
        assert _held_by(client, names.rollouts, names.groups[names.rollouts], "teacher-0") == 0
        pipe.start("teacher", "teacher-1", overrides, tmp_path)

        wait_until("a few learner steps", lambda: _step(client, names) >= 3, pipe)
        _assert_clean_stop(actor, _sigterm(actor), "actor-0: stopped after")
        assert not client.sismember(names.key("actors"), "actor-0")
        pipe.start("actor", "actor-1", overrides, tmp_path)

        wait_until("more learner steps", lambda: _step(client, names) >= 6, pipe)
        learner = pipe.roles["learner-0"]
        _assert_clean_stop(learner, _sigterm(learner), "learner stopped, checkpointed:")
        state = _state(client, names)
        assert state is not None and state.step < STEPS, "the run ended before the learner was stopped: raise STEPS"
        checkpoint = latest_checkpoint(tmp_path / "learner" / "checkpoints")
        assert checkpoint is not None
        meta = read_meta(checkpoint)
        assert (meta.step, meta.policy_version) == (state.step, state.version)
        first_life = learner.log()

        restarted = pipe.start("learner", "learner-0", overrides, tmp_path)
        wait_until("the restarted learner finishing", lambda: restarted.proc.poll() is not None, pipe, timeout_s=600)
        assert restarted.proc.returncode == 0, restarted.log()[-4000:]
        resumed = restarted.log()[len(first_life):]
        assert f"at step {meta.step}, policy v{meta.policy_version}" in resumed, resumed[-3000:]
    finally:
        pipe.stop_all()

    counts = assert_conserved_and_trained_once(client, names, tmp_path / "learner")
    assert counts["duplicates"] == 0, counts
    rows = [json.loads(line) for line in (tmp_path / "learner" / "trained_ids.jsonl").read_text().splitlines()]
    trained = [(row["step"], row["version"]) for row in rows if not row["replayed"]]
    steps = [s for s, _v in trained]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= STEPS, steps  # no step lost or repeated
    assert [v for _s, v in trained] == sorted({v for _s, v in trained}), trained  # the version moves on with each
    for role in pipe.roles.values():
        assert "Traceback" not in role.log(), f"{role.name}:\n{role.log()[-3000:]}"


def test_a_drain_past_the_bound_exits_anyway_and_loses_nothing(redis_url: str, tiny_assets: Path,
                                                              tmp_path: Path) -> None:
    """transport.stop_timeout_s far below what a checkpoint takes: the learner exits at the bound, says what it
    left pending, and a restart (with a normal bound) takes those entries back and trains each once."""
    names = Names("sigbound")
    client = redis.Redis.from_url(redis_url)
    steps = 6
    publish(client, names, scored_messages(tiny_assets, steps * BATCH))
    workdir = tmp_path / "learner"
    overrides = [*learner_overrides(redis_url, names.namespace, tiny_assets, workdir, batch_size=BATCH,
                                    max_staleness=100, read_timeout_s=300, micro_batch_tokens=64,
                                    checkpoint_every=1000), "transport.claim_idle_ms=600000"]
    log_path = tmp_path / "learner.log"
    # More steps than there is data: the SIGTERM finds it training or waiting, never finished.
    proc = start(learner_command([*overrides, "learner.steps=100", "transport.stop_timeout_s=0.01"]), log_path)
    try:
        wait_for("a first step", lambda: _step(client, names) >= 1, proc, log_path)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=MARGIN_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert "the drain took longer than transport.stop_timeout_s=0.01s" in text, text[-3000:]
    assert "pending for learner-0, at step" in text and "Traceback" not in text, text[-3000:]

    restarted = start(learner_command([*overrides, f"learner.steps={steps}"]), tmp_path / "learner-2.log")
    try:
        code = restarted.wait(timeout=600)
    finally:
        if restarted.poll() is None:
            restarted.kill()
    assert code == 0, (tmp_path / "learner-2.log").read_text()[-3000:]
    counts = assert_conserved_and_trained_once(client, names, workdir)
    assert counts[ledger.TRAINED] == steps * BATCH, counts


def _up_command(tiny_assets: Path, workdir: Path) -> list[str]:
    sets = {"transport.redis_url": "null", "transport.stop_timeout_s": STOP_TIMEOUT_S, "run.workdir": workdir,
            "run.tiny_assets": "null", "run.warm_cache": "null", "run.fresh": "false", "run.actors": 1,
            "actor.model_dir": tiny_assets / "student", "actor.prompts_file": tiny_assets / "prompts.jsonl",
            "teacher.model_dir": tiny_assets / "teacher", "teacher.cache_dir": workdir / "cache",
            "learner.model_dir": tiny_assets / "student", "learner.workdir": workdir / "learner",
            "learner.eval.heldout_file": "", "learner.batch_size": BATCH, "teacher.batch_size": BATCH}
    cmd = [sys.executable, "-m", "opd.cli", "up", "--config", str(REPO / "configs" / "tiny-cpu.yaml"), "--no-progress",
           "--steps", "100000"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_opd_up_stops_roles_in_order_and_prints_the_summary(signum: int, tiny_assets: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    log_path = tmp_path / "launcher.log"
    history = workdir / "learner" / "history.jsonl"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(_up_command(tiny_assets, workdir), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if history.exists() and history.read_text().count("\n") >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None and history.exists(), log_path.read_text()[-3000:]
        proc.send_signal(signum)
        code = proc.wait(timeout=3 * (STOP_TIMEOUT_S + MARGIN_S))
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text(errors="replace")
    name = signal.Signals(signum).name
    assert code == 128 + signum, text[-4000:]
    marks = [f"{name}: stopping the run", "stopping actors: actor-0", "stopping teachers: teacher-0",
             "stopping learner: learner-0", "opd pipeline", "stopping redis-server", f"run interrupted by {name}"]
    at = [text.find(m) for m in marks]
    assert -1 not in at and at == sorted(at), (list(zip(marks, at, strict=True)), text[-4000:])
    for stage in ("actors stopped (exit codes: actor-0 0)", "teachers stopped (exit codes: teacher-0 0)",
                  "learner stopped (exit codes: learner-0 0)"):
        assert stage in text, text[-4000:]
    assert (workdir / "summary.png").stat().st_size > 0
    assert latest_checkpoint(workdir / "learner" / "checkpoints") is not None
    for role_log in sorted((workdir / "logs").glob("*.log")):
        role_text = role_log.read_text(errors="replace")
        assert "SIGTERM: stopping" in role_text, f"{role_log.name}:\n{role_text[-3000:]}"
        for bad in ("Traceback", "ConnectionError", "unreachable"):
            assert bad not in role_text, f"{role_log.name}:\n{role_text[-3000:]}"
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(workdir)) == []
