"""A full disk under the teacher cache, the checkpoints and the published weights (issue 11).

The disk is real: a small tmpfs mounted for the test, filled to the last page by a filler file, then freed.
Mounting needs root: without it the tests skip, saying so and with the OS error, on a developer's machine,
and fail under CI (`CI` set, `OPD_REQUIRE_ROOT_TESTS=1`, or run by `.ci/run`: tests/integration/ci_policy.py),
where they must run. Pinned:
- cache (the real `TeacherCache`, real Redis): a put on the full disk raises `CacheDiskFull`, logged once
  however many puts fail, with no shard rolled over or created; nothing half-written is ever served
  (every indexed entry reads back exactly) and caching resumes by itself once space is back; the cache
  verifies clean;
- checkpoints and published weights: a write on the full disk raises `WriteFailed` naming the directory
  and the OS error, leaves no temporary directory, and the previous checkpoint / weights are byte for byte
  what they were and still load;
- the pipeline as real processes (actor, teacher, learner), all three disks filled mid-run: the teacher
  keeps scoring and forwarding and says "disk full" once, counted in `opd_cache_write_errors_total`; the
  learner says its checkpoints and weights failed (`opd_learner_write_failures_total`) and trains on,
  actors keep the announced weights; the learner SIGKILLed while the disk is full resumes from the last
  good checkpoint plus its journal; with space back it finishes, every prefix is accounted for once
  (ledger + lineage) and `opd cache verify` is clean;
- the learner started on a damaged checkpoint stops with one line naming the file, no traceback;
- Redis's own disk (a real redis-server, its AOF on the tmpfs): the writes it refuses (MISCONF) are waited out
  with one line naming the refusal, go through exactly once when space is back, and past
  `reconnect_give_up_s` end in one `RedisUnavailable` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
import transformers
from ci_policy import skip_or_fail
from roles import (
    CONFIG,
    Pipeline,
    RedisServer,
    Role,
    assert_conserved_and_trained_once,
    metric,
    pipeline_overrides,
    wait_until,
)

from cache import ops
from cache.store import TeacherCache
from cache.writer import CacheDiskFull
from learner.checkpoint import WriteFailed, latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from learner.publish import list_published, publish_weights
from protocol.names import Names
from protocol.reconnect import Outages, ReconnectPolicy, RedisUnavailable, RideOutRetry
from protocol.runtime import latest_weights

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FILLER = "filler"
PAD = "x" * 8192


# ---------------------------------------------------------------------------------------------
# a real small disk
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """`mount(name, size)`: a fresh tmpfs of `size` (e.g. "8m") at tmp_path/name; always unmounted after."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        where = tmp_path / name
        where.mkdir(parents=True, exist_ok=True)
        try:
            out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                                 capture_output=True, text=True)
            error = (out.stderr.strip() or f"exit code {out.returncode}") if out.returncode != 0 else ""
        except OSError as exc:  # no `mount` binary at all
            error = f"{type(exc).__name__}: {exc}"
        if error:
            skip_or_fail(f"cannot mount a tmpfs at {where} (mounting needs root; this is uid {os.geteuid()}): {error}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # still busy: detach it


def fill(mount: Path) -> Path:
    """Take every free page of `mount` with a filler file (writes fail with ENOSPC from now on)."""
    path = mount / FILLER
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    assert os.statvfs(mount).f_bavail == 0
    return path


def free_port() -> int:
    """A free loopback port (not `conftest.free_port`: tests/integration/test_ci_policy.py imports this module
    from a child pytest that has no tests/conftest.py on its path)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free(mount: Path) -> None:
    (mount / FILLER).unlink(missing_ok=True)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# the real classes
# ---------------------------------------------------------------------------------------------


def scores(ids_T: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic 'teacher' values of each position's prefix: a served value that differs is garbage."""
    h_T = np.cumsum(ids_T.astype(np.int64) * 2654435761 % 1000003) % 1000003
    lp = -(h_T % 9973).astype(np.float32) / 997.0
    ids = ((h_T[:, None] + np.arange(k)[None, :] * 7919) % 50_000).astype(np.int32)
    tlp = -(np.arange(k, dtype=np.float32)[None, :] + (h_T[:, None] % 101).astype(np.float32) / 101)
    return lp, ids, tlp


def seq(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, 150).astype(np.int32)


def test_cache_on_a_full_disk_degrades_and_recovers(tmpfs: Callable[[str, str], Path], redis_url: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    disk = tmpfs("cache-disk", "4m")
    client = redis.Redis.from_url(redis_url)
    k = 8
    cache = TeacherCache(disk / "cache", client, k=k, teacher_identity="t", writer_id="w0", shard_rows=4096,
                         chunk_bytes=1 << 16, block_size=16)
    try:
        for s in range(3):
            assert cache.put(seq(s), *scores(seq(s), k), 0).blocks_written > 0
        shards_before, active = cache.root.list_shards(), cache.active_shard
        indexed = client.hlen(cache.names.index)
        fill(disk)
        caplog.set_level(logging.INFO, logger="cache.writer")
        for s in range(3, 9):
            with pytest.raises(CacheDiskFull, match="No space left on device"):
                cache.put(seq(s), *scores(seq(s), k), 0)
        full_lines = [r for r in caplog.records if "disk full under" in r.getMessage()]
        assert len(full_lines) == 1 and str(disk / "cache") in full_lines[0].getMessage()
        # The shard is not the disk's victim: no roll-over, no new (half-created) shard, nothing indexed.
        assert cache.root.list_shards() == shards_before and cache.active_shard == active
        assert client.hlen(cache.names.index) == indexed
        for s in range(3, 9):
            assert cache.lookup(seq(s)).prefix_len == 0
        free(disk)
        for s in range(3, 9):
            assert cache.put(seq(s), *scores(seq(s), k), 0).blocks_written > 0
        assert any("writing again" in r.getMessage() for r in caplog.records)
        for s in range(9):
            hit = cache.lookup(seq(s))
            lp, ids, tlp = scores(seq(s), k)
            assert hit.prefix_len == 150
            assert np.array_equal(hit.logprobs_N[1:], lp[1:]) and np.array_equal(hit.topk_ids_NK[1:], ids[1:])
            assert np.array_equal(hit.topk_logprobs_NK[1:], tlp[1:])
    finally:
        cache.close()
    report = ops.verify(disk / "cache", client)
    assert report.ok, report.summary()


def _model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))


def test_checkpoint_and_weights_on_a_full_disk_keep_the_previous(tmpfs: Callable[[str, str], Path]) -> None:
    disk = tmpfs("learner-disk", "4m")
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    good = save_checkpoint(disk / "checkpoints", model, optimizer, step=1, policy_version=1)
    weights, _ = publish_weights(model, disk / "weights", 1, keep_last=2)
    before = {good: tree_digest(good), weights: tree_digest(weights)}
    fill(disk)
    with pytest.raises(WriteFailed) as info:
        save_checkpoint(disk / "checkpoints", model, optimizer, step=2, policy_version=2)
    msg = str(info.value)
    assert info.value.reason == "disk_full" and "No space left on device" in msg
    assert str(disk / "checkpoints" / "step-000002") in msg and f"the previous one, {good}, is intact" in msg
    with pytest.raises(WriteFailed, match=r"weights .*v000002 not written .*No space left on device") as info:
        publish_weights(model, disk / "weights", 2, keep_last=2)
    assert info.value.reason == "disk_full"
    for root in (disk / "checkpoints", disk / "weights"):
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "a temporary dir was left behind"
    assert latest_checkpoint(disk / "checkpoints") == good and list_published(disk / "weights") == [weights]
    assert {p: tree_digest(p) for p in before} == before
    load_checkpoint(good, _model(), torch.optim.AdamW(_model().parameters(), lr=1e-2))
    free(disk)
    assert save_checkpoint(disk / "checkpoints", model, optimizer, step=2, policy_version=2).name == "step-000002"


def test_writes_to_a_redis_on_a_full_disk_wait_and_then_go_through(tmpfs: Callable[[str, str], Path],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Redis's own disk full: its MISCONF refusals are waited out like an outage (one line naming it), and once
    the disk has room every write goes through exactly once (a refused write did nothing, so its retry is no
    repeat)."""
    caplog.set_level(logging.WARNING, logger="protocol.reconnect")
    disk = tmpfs("redis-disk", "8m")
    server = RedisServer(disk, free_port())
    server.start()
    try:
        outages = Outages()
        client = redis.Redis.from_url(server.url, socket_timeout=10, retry=RideOutRetry(
            ReconnectPolicy(base_s=0.05, cap_s=0.2, give_up_s=120), "test-redis", outages=outages))
        client.incr("n")
        fill(disk)
        result: dict[str, object] = {}

        def writes() -> None:
            try:
                for i in range(20):
                    client.incr("n")
                    client.xadd("s", {"i": i, "pad": PAD})  # past the AOF file's last page: a write needs a new one
                result["ok"] = True
            except Exception as exc:  # surfaced by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=writes)
        thread.start()
        deadline = time.monotonic() + 60
        while outages.since is None:  # a write was refused, and is being waited out
            assert time.monotonic() < deadline and thread.is_alive(), f"no refusal waited out: {result}"
            time.sleep(0.02)
        time.sleep(1.0)
        assert thread.is_alive() and not result, result
        assert client.get("n") is not None  # reads still work
        free(disk)
        thread.join(timeout=120)
        assert result == {"ok": True}
        assert int(client.get("n") or 0) == 21 and client.xlen("s") == 20
        [line] = [r.getMessage() for r in caplog.records if "refuses writes" in r.getMessage()]
        assert "MISCONF" in line and "test-redis" in line
        assert not any(r.exc_info for r in caplog.records)
    finally:
        server.stop()


def test_a_full_redis_disk_past_give_up_is_one_clear_error(tmpfs: Callable[[str, str], Path]) -> None:
    disk = tmpfs("redis-disk", "8m")
    server = RedisServer(disk, free_port())
    server.start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=10, retry=RideOutRetry(
            ReconnectPolicy(base_s=0.01, cap_s=0.05, give_up_s=0.5), "test-redis", outages=Outages()))
        client.set("k", "v")
        fill(disk)
        with pytest.raises(RedisUnavailable, match=r"refuses writes .*reconnect_give_up_s.*MISCONF") as info:
            for _ in range(100):  # the first is executed and its append-only write fails; the refusals follow
                client.set("k", PAD)
        assert isinstance(info.value, ConnectionError) and not isinstance(info.value, redis.RedisError)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# the roles as processes
# ---------------------------------------------------------------------------------------------


def _value(client: redis.Redis, names: Names, role: str, sample: str) -> float:
    return metric(client, names, role, sample) or 0.0


def _kill_and_restart_learner(pipe: Pipeline, redis_url: str, names: Names, tiny_assets: Path, tmp_path: Path,
                              base: dict[str, object]) -> tuple[Role, int]:
    """SIGKILL learner-0 and start learner-1 on the same work dir, 8 steps past its newest checkpoint."""
    learner = pipe.roles.pop("learner-0")
    learner.proc.send_signal(signal.SIGKILL)
    learner.proc.wait(timeout=60)
    good = latest_checkpoint(tmp_path / "learner" / "checkpoints")
    assert good is not None
    step = read_meta(good).step
    overrides = pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **base, **{"learner.steps": step + 8})
    return pipe.start("learner", "learner-1", overrides, tmp_path), step


def test_pipeline_rides_out_full_disks(tmpfs: Callable[[str, str], Path], redis_url: str, tiny_assets: Path,
                                       tmp_path: Path) -> None:
    names = Names("diskfull")
    client = redis.Redis.from_url(redis_url)
    cache_disk = tmpfs("cache-disk", "16m")
    ckpt_disk = tmpfs("learner/checkpoints", "16m")
    weights_disk = tmpfs("learner/weights", "16m")
    base = {"teacher.cache_dir": cache_disk / "cache", "learner.checkpoint_every": 2, "learner.max_staleness": 2}
    pipe = Pipeline()
    cache_full = 'opd_cache_write_errors_total{reason="disk_full"}'
    ckpt_full = 'opd_learner_write_failures_total{reason="disk_full",what="checkpoint"}'  # labels sorted by name
    weights_full = 'opd_learner_write_failures_total{reason="disk_full",what="weights"}'
    try:
        pipe.start("learner", "learner-0", pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **base,
                                                              **{"learner.steps": 1000}), tmp_path)
        pipe.start("teacher", "teacher-0", pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **base), tmp_path)
        pipe.start("actor", "actor-0", pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **base), tmp_path)
        wait_until("a first checkpoint and cached scores",
                   lambda: latest_checkpoint(ckpt_disk) is not None
                   and _value(client, names, "teacher-0", "opd_cache_bytes_written_total") > 0, pipe)
        for disk in (cache_disk, ckpt_disk, weights_disk):
            fill(disk)
        wait_until("the teacher, checkpoint and weights writes failing for lack of space",
                   lambda: _value(client, names, "teacher-0", cache_full) >= 1
                   and _value(client, names, "learner-0", ckpt_full) >= 1
                   and _value(client, names, "learner-0", weights_full) >= 1, pipe)
        good = latest_checkpoint(ckpt_disk)
        assert good is not None
        announced = latest_weights(client, names)
        assert announced is not None and (Path(announced.path) / "config.json").is_file()

        restarted, step = _kill_and_restart_learner(pipe, redis_url, names, tiny_assets, tmp_path, base)
        assert latest_weights(client, names) == announced  # actors were never pointed at weights not on disk
        assert latest_checkpoint(ckpt_disk) == good
        wait_until("the restarted learner resuming from the last good checkpoint",
                   lambda: f"resumed from {good}" in restarted.log(), pipe)
        for disk in (cache_disk, ckpt_disk, weights_disk):
            free(disk)
        wait_until("the learner finishing", lambda: restarted.proc.poll() is not None, pipe, timeout_s=600)
        assert restarted.proc.returncode == 0, restarted.log()[-4000:]
    finally:
        pipe.stop_all()

    assert_conserved_and_trained_once(client, names, tmp_path / "learner")  # the uncached scores were forwarded too
    teacher_log = pipe.roles["teacher-0"].log()
    assert teacher_log.count("disk full under") == 1 and "writing again" in teacher_log
    assert "Traceback" not in teacher_log
    first_learner = (tmp_path / "learner-0.log").read_text()
    assert "not written (" in first_learner and "No space left on device" in first_learner
    assert "Traceback" not in first_learner
    assert latest_checkpoint(ckpt_disk) is not None and read_meta(latest_checkpoint(ckpt_disk)).step > step
    verify = subprocess.run(
        [sys.executable, "-m", "opd.cli", "cache", "verify", "--config", str(CONFIG),
         *[a for o in pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **base) for a in ("--set", o)]],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_learner_on_a_damaged_checkpoint_names_the_file(redis_url: str, tiny_assets: Path, tmp_path: Path) -> None:
    """`opd learner` on a truncated checkpoint: exit 1 with one line naming the file, no traceback."""
    names = Names("damagedckpt")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_assets / "student")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = save_checkpoint(tmp_path / "learner" / "checkpoints", model, optimizer, scheduler, step=4, policy_version=4)
    weights = path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    overrides = pipeline_overrides(redis_url, names, tiny_assets, tmp_path, **{"learner.steps": 8})
    out = subprocess.run([sys.executable, "-m", "opd.cli", "learner", "--config", str(CONFIG),
                          *[a for o in overrides for a in ("--set", o)]],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert f"cannot resume from checkpoint {path}" in out.stderr and str(weights) in out.stderr, out.stderr
