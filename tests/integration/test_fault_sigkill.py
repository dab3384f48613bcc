"""SIGKILL of each role in one running pipeline: nothing is lost and nothing is trained twice.

One pipeline (learner, two teachers, two actors, each `python -m opd.cli <role>`, real Redis, tiny models)
takes three real SIGKILLs in turn and a restart after each:
- an actor while it generates: what it had not published is simply never produced; what it published stays;
- a teacher while it holds entries (caught holding them): they stay pending in the group and are claimed
  again after `transport.claim_idle_ms`, by the other teacher or by the restarted one;
- the learner between checkpoints: the restarted learner replays its journal and publishes a version no
  older than the one the actors saw before the kill.
At the end the books close: every produced id has one terminal outcome in the ledger, the learner's
lineage lists each trained id once (journal replays flagged), and the role that restarted says so.

A second pipeline SIGKILLs actor after actor while each holds admission slots, more of them than the
staleness window has slots, while another actor keeps producing: each dead actor's lease expires and its
slots come back (issue 16, defect 2), so the run trains all its steps.
"""

from __future__ import annotations

import contextlib
import signal
import time
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

from protocol import admission, ledger
from protocol.names import Names
from protocol.state import LearnerState, read_state

pytestmark = pytest.mark.integration

FIRST_LIFE_STEPS = 100_000  # the first learner never finishes on its own: the faults land mid-run however fast it is
MORE_STEPS = 10  # the restarted learner's run ends this many steps past where the kill left it
CHECKPOINT_EVERY = 3


def _state(client: redis.Redis, names: Names) -> LearnerState | None:
    with contextlib.suppress(redis.RedisError):
        state = read_state(client, names)
        if isinstance(state, LearnerState):
            return state
    return None


def _step(client: redis.Redis, names: Names) -> int:
    state = _state(client, names)
    return -1 if state is None else state.step


def _kill(pipe: Pipeline, name: str) -> None:
    """SIGKILL a role and forget it (a killed role is not a failed one; its restart takes the name again)."""
    proc = pipe.roles.pop(name).proc
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _kill_teacher_holding(client: redis.Redis, names: Names, pipe: Pipeline, name: str) -> list[str]:
    """SIGKILL the teacher at a moment it holds entries (paused first to catch one; SIGKILL reaches a paused
    process); returns them."""
    held = pause_while_holding(client, names, pipe, name)
    _kill(pipe, name)
    return held


def test_sigkill_of_every_role_loses_nothing(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    """SIGKILL an actor mid-generation, a teacher mid-batch and the learner between checkpoints, restart each."""
    names = Names("sigkill")
    client = redis.Redis.from_url(redis_url)
    settings = {"learner.checkpoint_every": CHECKPOINT_EVERY, "learner.max_staleness": 4,
                "transport.claim_idle_ms": 3000}
    overrides = pipeline_overrides(redis_url, names, tiny_assets, tmp_path,
                                   **settings, **{"learner.steps": FIRST_LIFE_STEPS})
    pipe, life2 = Pipeline(), tmp_path / "life2"
    life2.mkdir()
    try:
        pipe.start("learner", "learner-0", overrides, tmp_path)
        for i in range(2):
            pipe.start("teacher", f"teacher-{i}", overrides, tmp_path)
            pipe.start("actor", f"actor-{i}", overrides, tmp_path)
        wait_until("two learner steps", lambda: _step(client, names) >= 2, pipe)

        # an actor, while it generates (it produces continuously below the high-water mark)
        produced = metric(client, names, "actor-0", "opd_actor_prefixes_total") or 0.0
        wait_until("actor-0 producing", lambda: (metric(client, names, "actor-0", "opd_actor_prefixes_total") or 0)
                   > produced, pipe)
        _kill(pipe, "actor-0")
        pipe.start("actor", "actor-0", overrides, life2)

        # a teacher, mid-batch: what it held is claimed again
        held = _kill_teacher_holding(client, names, pipe, "teacher-0")
        wait_until("the killed teacher's entries claimed again",
                   lambda: not set(held) & set(held_by(client, names, "teacher-0")), pipe)
        pipe.start("teacher", "teacher-0", overrides, life2)

        # the learner, between checkpoints
        wait_until("a learner step between checkpoints",
                   lambda: (s := _step(client, names)) > CHECKPOINT_EVERY and s % CHECKPOINT_EVERY != 0, pipe)
        before = _state(client, names)
        assert before is not None
        _kill(pipe, "learner-0")
        end = before.step + MORE_STEPS  # `learner.steps` counts from the start of the run, across restarts
        learner = pipe.start("learner", "learner-0", pipeline_overrides(
            redis_url, names, tiny_assets, tmp_path, **settings, **{"learner.steps": end}), life2)
        version = lambda: metric(client, names, "learner-0", "opd_learner_policy_version")  # noqa: E731
        wait_until("the restarted learner serving metrics", lambda: version() is not None, pipe)
        after = _state(client, names)
        assert after is not None and after.version >= before.version and after.step >= before.step, (before, after)
        assert (version() or 0) >= before.version

        wait_until("the learner finishing", lambda: learner.proc.poll() is not None, pipe, timeout_s=600)
        assert learner.proc.returncode == 0, learner.log()[-4000:]
    finally:
        pipe.stop_all()

    counts = assert_conserved_and_trained_once(client, names, tmp_path / "learner")
    assert counts[ledger.TRAINED] >= end * 4, counts
    assert _step(client, names) >= end  # (the drain at the end trains what was in flight: a step or more past)


LEASE_S = 2.0
VICTIMS = 4  # each holds up to one actor batch (4) of a window of (max_staleness + 1) x 4 = 8 slots


def _kill_actor_holding(client: redis.Redis, names: Names, pipe: Pipeline, name: str) -> int:
    """SIGKILL the actor at a moment it holds admission slots (paused first to catch it); returns how many."""
    proc = pipe.roles[name].proc
    held = 0

    def paused_holding() -> bool:
        nonlocal held
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)  # a command it sent just before the pause still executes: let it land
        held = admission.leases(client, names).get(name, 0)
        if held:
            return True
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
        return False

    wait_until(f"{name} paused while holding admission slots", paused_holding, pipe, poll_s=0.0)
    _kill(pipe, name)
    return held


def test_sigkilled_actors_give_their_admission_slots_back(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    """SIGKILL four actors in turn, each while it holds admission slots, while another actor keeps producing.

    Reproduces issue 16 defect 2: the slots of a SIGKILLed actor were never given back, and two such kills
    filled the window of this run: no actor was admitted again and the learner stopped after
    `learner.read_timeout_s`. Now each lease expires `actor.lease_s` after its actor died. The first learner
    never ends on its own (the kills land mid-run however fast it is); after them it is stopped and restarted
    for MORE_STEPS steps, which it must finish, drain included, with the keeper alone producing.
    """
    names = Names("leases")
    client = redis.Redis.from_url(redis_url)
    settings = {"learner.max_staleness": 1, "learner.read_timeout_s": 120, "actor.batch_size": 4,
                "actor.lease_s": LEASE_S}
    overrides = pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **settings,
                                   **{"learner.steps": FIRST_LIFE_STEPS})
    pipe, killed = Pipeline(), 0
    actors = ["keeper", *[f"victim-{i}" for i in range(VICTIMS)]]
    try:
        for name in actors:  # all up first: an actor admits nothing before the learner publishes its state
            pipe.start("actor", name, overrides, tmp_path)
        wait_until("every actor registered", lambda: all(client.sismember(names.actors, a) for a in actors), pipe)
        pipe.start("teacher", "teacher-0", overrides, tmp_path)
        pipe.start("learner", "learner-0", overrides, tmp_path)
        for name in actors[1:]:
            killed += _kill_actor_holding(client, names, pipe, name) > 0
        assert killed == VICTIMS
        wait_until("the dead actors' leases reclaimed", lambda: not [
            a for a in admission.leases(client, names) if a.startswith("victim")], pipe, timeout_s=120)
        assert not [a for a in client.smembers(names.actors) if a.startswith(b"victim")]  # out of the registry
        learner = pipe.roles.pop("learner-0")
        learner.proc.send_signal(signal.SIGTERM)
        assert learner.proc.wait(timeout=300) == 0, learner.log()[-4000:]
        end = _step(client, names) + MORE_STEPS
        learner = pipe.start("learner", "learner-1", pipeline_overrides(
            redis_url, names, tiny_assets, tmp_path, **settings, **{"learner.steps": end}), tmp_path)
        wait_until("the learner finishing", lambda: learner.proc.poll() is not None, pipe, timeout_s=600)
        assert learner.proc.returncode == 0, learner.log()[-4000:]
        wait_until("the keeper leaving", lambda: pipe.roles["keeper"].proc.poll() is not None, pipe)
    finally:
        pipe.stop_all()

    assert _step(client, names) >= end
    assert admission.leases(client, names) == {} and client.scard(names.actors) == 0  # nobody lives: nothing held
    assert_conserved_and_trained_once(client, names, tmp_path / "learner")
