"""Helpers for learner tests: real scored prefixes and the learner as a subprocess.

Messages are what the pipeline would carry: student samples from the tiny student (with their behaviour
logprobs) scored by the tiny teacher (logprobs and top-k), published on the scored stream with the
ledger outcome ``produced`` the actors record.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

from actors.engines.hf import HFRolloutEngine
from cache.scorers.hf import HFTeacherScorer
from opd.tiny import asset_paths
from protocol import ledger
from protocol.messages import RolloutPrefix, ScoredPrefix, WeightsAnnouncement
from protocol.names import Names
from protocol.runtime import latest_weights
from protocol.state import LearnerState, read_state
from protocol.streams import StreamQueue

REPO = Path(__file__).resolve().parents[2]


def scored_messages(root: Path, n: int, *, seed: int = 0, max_new_tokens: int = 8, topk: int = 4) -> list[ScoredPrefix]:
    """``n`` scored prefixes of the tiny student's own samples (policy version 0)."""
    from transformers import AutoTokenizer

    paths = asset_paths(root)
    tokenizer = AutoTokenizer.from_pretrained(paths.student_dir)
    texts = [json.loads(line)["prompt"] for line in paths.prompts_file.read_text().splitlines() if line.strip()]
    prompts = [list(tokenizer(texts[i % len(texts)])["input_ids"]) for i in range(n)]
    engine = HFRolloutEngine(paths.student_dir)
    gens = engine.generate(prompts, [max_new_tokens] * n, temperature=1.0, top_p=1.0, seed=seed)
    scorer = HFTeacherScorer(paths.teacher_dir)
    sequences = [np.asarray(p + g.response_ids, dtype=np.int32) for p, g in zip(prompts, gens, strict=True)]
    scores = scorer.score(sequences, [len(p) for p in prompts], k=topk)
    out = []
    for i, (prompt, gen, sc) in enumerate(zip(prompts, gens, scores, strict=True)):
        rollout = RolloutPrefix(
            prompt_ids_P=np.asarray(prompt, dtype=np.int32), response_ids_R=np.asarray(gen.response_ids, dtype=np.int32),
            behaviour_logprobs_R=np.minimum(np.asarray(gen.logprobs, dtype=np.float32), 0.0), prompt_index=i,
            horizon=max_new_tokens, max_new_tokens=max_new_tokens, finished=gen.finished, policy_version=0,
            actor_id="test-actor",
        )
        out.append(ScoredPrefix.from_rollout(rollout, teacher_logprobs_R=sc.logprobs_R, topk_ids_RK=sc.topk_ids_RK,
                                             topk_logprobs_RK=sc.topk_logprobs_RK, teacher_id="test-teacher"))
    return out


PRODUCER = "test-publisher"
"""The producer id `publish` counts its entries under (`names.produced_by`: the conservation books' witness)."""


def publish(client: redis.Redis, names: Names, messages: list[ScoredPrefix]) -> None:
    """Put messages on the scored stream as a teacher would, each recorded ``produced`` in the ledger and counted
    for `PRODUCER`, as an actor counts what it publishes."""
    q = StreamQueue(client, names.scored, names=names)
    for m in messages:
        q.publish(m, ledger_outcome=ledger.PRODUCED, producer=PRODUCER)


def learner_overrides(redis_url: str, namespace: str, root: Path, workdir: Path, **learner: object) -> list[str]:
    base = [f"transport.redis_url={redis_url}", f"transport.namespace={namespace}", "run.tiny_assets=null", "run.warm_cache=null",
            f"learner.model_dir={asset_paths(root).student_dir}", f"learner.workdir={workdir}", "learner.device=cpu"]
    return base + [f"learner.{k}={v}" for k, v in learner.items()]


def learner_command(overrides: list[str], *, launcher: list[str] | None = None) -> list[str]:
    cmd = [*(launcher or [sys.executable]), "-m", "opd.cli", "learner", "--id", "learner-0"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def start(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Run ``cmd`` (in a session of its own, so signals meant for the test runner do not reach it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; torchrun's ranks are not in its process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and every process under it at once (nothing gets to clean up)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log_path: Path,
             timeout_s: float = 120.0) -> None:
    """Poll until ``check()``; fail with the learner's log if it exits or the guard runs out."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"learner exited ({proc.returncode}) before {what}:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.1)


def learner_step(client: redis.Redis, names: Names) -> int:
    state = read_state(client, names)
    return state.step if isinstance(state, LearnerState) else -1


def announcement(client: redis.Redis, names: Names) -> WeightsAnnouncement | None:
    return latest_weights(client, names)


def wait_for_new_announcement(client: redis.Redis, names: Names, before: WeightsAnnouncement, what: str,
                              proc: subprocess.Popen[bytes], log_path: Path) -> WeightsAnnouncement:
    """Poll until a weights announcement newer than `before` appears (a restarted learner's); return it."""

    def newer() -> bool:
        ann = announcement(client, names)
        return ann is not None and ann.created_at > before.created_at

    wait_for(what, newer, proc, log_path)
    after = announcement(client, names)
    assert after is not None
    return after


def pending_entries(client: redis.Redis, names: Names) -> list[dict[str, object]]:
    if not client.exists(names.scored):
        return []
    return list(client.xpending_range(names.scored, names.groups[names.scored], "-", "+", 1000))


def lineage(path: Path) -> dict[int, dict[str, object]]:
    """The last row written for each step of ``trained_ids.jsonl``: the steps the final weights contain."""
    rows: dict[int, dict[str, object]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[int(row["step"])] = row
    return rows
