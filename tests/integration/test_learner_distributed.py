"""The data-parallel learner: two ranks under `torchrun --standalone` on CPU (gloo).

Pins:
- DDP: both ranks read their own share of the stream (consumer names learner-0 and learner-1), step the
  same number of times and end with bit-identical parameters (each rank's checksum is in Redis); rank 0
  alone publishes, and the announced weights load with `from_pretrained` and hash to the same checksum;
  every message is trained exactly once across the ranks' lineages;
- FSDP2 (`learner.fsdp=true`, `fully_shard`), killed with SIGKILL (torchrun and both ranks) after a
  checkpoint and one more committed step, then restarted: it resumes (weights and re-sharded optimizer
  state from the checkpoint, the step replayed from both ranks' journals) at the version it had
  announced, finishes, and every message is trained exactly once; the gathered weights it publishes
  load with `from_pretrained`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import redis
import torch
from learner_streams import (
    announcement,
    kill_tree,
    learner_command,
    learner_overrides,
    learner_step,
    lineage,
    publish,
    scored_messages,
    start,
    wait_for,
    wait_for_new_announcement,
)

from learner.checkpoint import latest_checkpoint, read_meta
from learner.distributed import checksum
from protocol import ledger
from protocol.names import Names

pytestmark = pytest.mark.integration

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _command(redis_url: str, tiny_assets: Path, workdir: Path, namespace: str, steps: int, *extra: str) -> list[str]:
    if not TORCHRUN.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed next to this Python")
    launcher = [str(TORCHRUN) if TORCHRUN.exists() else "torchrun", "--standalone", "--nproc_per_node=2",
                "--no-python", sys.executable]
    overrides = learner_overrides(redis_url, namespace, tiny_assets, workdir, batch_size=4, steps=steps,
                                  checkpoint_every=2, max_staleness=10, read_timeout_s=120, micro_batch_tokens=64)
    return learner_command([*overrides, *extra], launcher=launcher)


def _trained_exactly_once(client: redis.Redis, names: Names, workdir: Path, n: int, steps: int) -> None:
    counts = ledger.counts(client, names)
    assert counts[ledger.TRAINED] == n and counts[ledger.PRODUCED] == 0, counts
    paths = sorted(workdir.glob("trained_ids*.jsonl"))
    assert len(paths) == 2
    ids: list[str] = []
    for path in paths:
        rows = lineage(path)
        assert sorted(rows) == list(range(1, steps + 1)), path  # every rank took part in every step
        ids += [i for row in rows.values() for i in row["ids"]]  # type: ignore[attr-defined]
    assert len(ids) == len(set(ids)) == n


def _replicas(client: redis.Redis, names: Names) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(names.key("learner:replicas")).items()}


def test_ddp_two_ranks_stay_identical(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    names, workdir, log_path = Names("ddp"), tmp_path / "learner", tmp_path / "torchrun.log"
    client = redis.Redis.from_url(redis_url)
    publish(client, names, scored_messages(tiny_assets, 12))
    proc = start(_command(redis_url, tiny_assets, workdir, names.namespace, 3), log_path)
    try:
        assert proc.wait(timeout=240) == 0, log_path.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            kill_tree(proc)

    replicas = _replicas(client, names)
    assert set(replicas) == {"0", "1"}
    assert replicas["0"] == replicas["1"] and replicas["0"].startswith("3:"), replicas
    _trained_exactly_once(client, names, workdir, 12, 3)
    consumers = {c["name"].decode() for c in client.xinfo_consumers(names.scored, "learners")}
    assert consumers == {"learner-0", "learner-1"}

    from transformers import AutoModelForCausalLM

    ann = announcement(client, names)
    assert ann is not None and (ann.version, ann.step) == (3, 3)
    published = AutoModelForCausalLM.from_pretrained(ann.path, dtype=torch.float32)
    assert "3:" + checksum(published) == replicas["0"]
    ckpt = latest_checkpoint(workdir / "checkpoints")
    assert ckpt is not None and read_meta(ckpt).extra["ranks"] == 2


def test_fsdp2_sigkill_and_resume(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    names, workdir, log_path = Names("fsdp"), tmp_path / "learner", tmp_path / "torchrun.log"
    client = redis.Redis.from_url(redis_url)
    messages = scored_messages(tiny_assets, 16)
    cmd = _command(redis_url, tiny_assets, workdir, names.namespace, 4, "learner.fsdp=true")

    publish(client, names, messages[:12])  # 3 steps; the 4th waits for data
    proc = start(cmd, log_path)
    try:
        wait_for("step 3", lambda: learner_step(client, names) == 3, proc, log_path)
        before = announcement(client, names)
    finally:
        kill_tree(proc)
    assert before is not None and before.version == 3
    ckpt = latest_checkpoint(workdir / "checkpoints")
    assert ckpt is not None and read_meta(ckpt).step == 2 and read_meta(ckpt).extra["optimizer_keys"] == "names"

    proc = start(cmd, log_path)
    try:
        after = wait_for_new_announcement(client, names, before, "the restarted ranks' announcement", proc, log_path)
        assert (after.version, after.step) == (3, 3)
        publish(client, names, messages[12:])
        assert proc.wait(timeout=240) == 0, log_path.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert "replayed 1 journaled steps" in log_path.read_text()
    _trained_exactly_once(client, names, workdir, 16, 4)

    from transformers import AutoModelForCausalLM

    ann = announcement(client, names)
    assert ann is not None and (ann.version, ann.step) == (4, 4)
    published = AutoModelForCausalLM.from_pretrained(ann.path, dtype=torch.float32)
    assert _replicas(client, names) == {"0": "4:" + checksum(published), "1": "4:" + checksum(published)}
