"""The learner loop in-process on the tiny student: weight sync and bounded waits.

Pins:
- the weights the learner announces in Redis are a plain HF directory: a fresh
  `AutoModelForCausalLM.from_pretrained(path)` holds exactly the learner's parameters, the announcement
  carries the version, step and size on disk, and the publish metrics are exported;
- no data for `read_timeout_s` fails the run with an error saying what to check;
- a drain that never completes (an actor registered, prefixes in flight that never arrive) ends after
  `read_timeout_s` with an error naming what is missing, after checkpointing and publishing what was trained;
  an actor whose heartbeat lease expired (SIGKILLed) does not hold the drain up.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
from learner_streams import publish, scored_messages
from transformers import AutoModelForCausalLM

from learner.checkpoint import latest_checkpoint, read_meta
from learner.config import LearnerConfig
from learner.loop import Learner
from opd.tiny import asset_paths
from protocol import admission, ledger
from protocol.config import TransportConfig
from protocol.names import Names
from protocol.runtime import latest_weights
from protocol.state import LearnerState, read_state

pytestmark = pytest.mark.integration


def _learner(redis_url: str, tiny_assets: Path, workdir: Path, **cfg: object) -> Learner:
    cfg = {"max_staleness": 10, **cfg}
    config = LearnerConfig(model_dir=str(asset_paths(tiny_assets).student_dir), workdir=str(workdir), device="cpu",
                           batch_size=4, micro_batch_tokens=64, **cfg)  # type: ignore[arg-type]
    return Learner(config, TransportConfig(redis_url=redis_url, namespace="loop"), learner_id="learner-test")


def test_announced_weights_load_in_transformers_and_equal_the_learner(redis_url: str, tiny_assets: Path,
                                                                       tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    names = Names("loop")
    publish(client, names, scored_messages(tiny_assets, 8))
    learner = _learner(redis_url, tiny_assets, tmp_path / "learner", steps=2)
    first = latest_weights(client, names)
    assert first is not None and (first.version, first.step) == (0, 0)  # announced at start, before training
    summary = learner.run()
    assert summary.steps == 2 and summary.trained == 8

    ann = latest_weights(client, names)
    assert ann is not None and (ann.version, ann.step) == (2, 2) == (learner.version, learner.step)
    path = Path(ann.path)
    assert path.is_absolute() and ann.nbytes == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # safetensors only, never pickle
    fresh = AutoModelForCausalLM.from_pretrained(path)
    mine = learner.model.state_dict()
    theirs = fresh.state_dict()
    assert theirs.keys() == mine.keys()
    for key, value in mine.items():
        assert torch.equal(theirs[key], value), key
    assert not torch.equal(theirs["lm_head.weight"], AutoModelForCausalLM.from_pretrained(
        asset_paths(tiny_assets).student_dir).state_dict()["lm_head.weight"])  # it did train

    registry = learner.registry
    assert registry.get_sample_value("opd_learner_publish_bytes_total") >= ann.nbytes
    assert registry.get_sample_value("opd_learner_publish_seconds") is not None


def test_no_data_fails_after_read_timeout(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    learner = _learner(redis_url, tiny_assets, tmp_path / "learner", steps=2, read_timeout_s=0.5)
    with pytest.raises(TimeoutError, match=r"no scored prefixes for 0\.5s: are teachers and actors running"):
        learner.run()


def test_a_drain_that_never_completes_is_bounded(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    names = Names("loop")
    publish(client, names, scored_messages(tiny_assets, 4))
    client.sadd(names.key("actors"), "actor-gone")  # an actor that died without deregistering
    ledger.record(client, names, {"lost-in-flight": ledger.PRODUCED})
    workdir = tmp_path / "learner"
    learner = _learner(redis_url, tiny_assets, workdir, steps=1, read_timeout_s=1.0)
    with pytest.raises(TimeoutError, match=r"1 prefixes are still in flight.*actor-gone"):
        learner.run()
    ckpt = latest_checkpoint(workdir / "checkpoints")
    assert ckpt is not None and read_meta(ckpt).step == 1
    ann = latest_weights(client, names)
    assert ann is not None and ann.version == 1


def test_a_drain_does_not_wait_for_an_actor_whose_lease_expired(redis_url: str, tiny_assets: Path,
                                                               tmp_path: Path) -> None:
    """An actor SIGKILLed without deregistering stopped the drain until `read_timeout_s` (issue 16, defect 2: a
    dead actor is only reclaimed when someone asks; once the live actors stop, that is the draining learner)."""
    client = redis.Redis.from_url(redis_url)
    names = Names("loop")
    publish(client, names, scored_messages(tiny_assets, 4))
    admission.beat(client, names, "actor-killed", lease_ms=1)  # registered, heartbeat long stopped
    time.sleep(0.01)
    learner = _learner(redis_url, tiny_assets, tmp_path / "learner", steps=1, read_timeout_s=30.0)
    started = time.monotonic()
    assert learner.run().steps == 1
    assert time.monotonic() - started < 30.0
    assert not client.sismember(names.actors, "actor-killed")


def test_drops_while_waiting_free_admission_slots_at_once(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    """Stale work dropped while the learner waits is announced in its state's `retired` before the next step.

    Actors admit work against `retired` (actors/actor.py `Admission`); before the fix a learner that dropped all
    it had (stale work taken back after a restart: seen in CI on a full-disk test) published nothing until its
    next step, so no actor could produce the data that step needed: a deadlock until `read_timeout_s`.
    """
    client = redis.Redis.from_url(redis_url)
    names = Names("loop")
    messages = scored_messages(tiny_assets, 16)
    publish(client, names, messages[:8])  # two steps at version 0
    learner = _learner(redis_url, tiny_assets, tmp_path / "learner", steps=3, max_staleness=1, read_timeout_s=120)
    done = threading.Thread(target=learner.run, daemon=True)
    done.start()

    def state() -> LearnerState:
        got = read_state(client, names)
        assert isinstance(got, LearnerState), got
        return got

    deadline = time.monotonic() + 120
    while not (learner.step == 2 and state().retired == 8):
        assert time.monotonic() < deadline, "two steps were not trained"
        time.sleep(0.05)
    publish(client, names, messages[8:12])  # version 0 at learner version 2: lag 2 > max_staleness 1, dropped
    while state().retired < 12:
        assert learner.step == 2 and done.is_alive(), "the drops were announced only by a step"
        assert time.monotonic() < deadline, f"the drops never reached the state: retired {state().retired}"
        time.sleep(0.05)
    assert ledger.counts(client, names)[ledger.DROPPED] == 4
    publish(client, names, [dataclasses.replace(m, policy_version=2) for m in messages[12:]])  # fresh: step 3
    done.join(timeout=120)
    assert not done.is_alive() and learner.step == 3
