"""`opd up` as a user runs it: a private Redis, every role a process, and Ctrl-C stops them all.

Pins: with no Redis URL the launcher starts its own redis-server (loopback, AOF on, its own data
dir); SIGINT (Ctrl-C) ends the run with every child process gone (no orphans: actors, teachers,
learner and redis-server alike). With `learner.eval.accuracy_prompts` on, a finished run reports the
held-out greedy exact match in eval.jsonl, the summary's "held-out exact match (first -> last)" line, the
final table and a fourth plot panel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _processes_mentioning(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def test_ctrl_c_stops_every_process(tiny_assets: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "ctrlc-run"
    cmd = [sys.executable, "-m", "opd.cli", "up", "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
           "--no-progress", "--steps", "100000",
           "--set", "transport.redis_url=null", "--set", f"run.workdir={workdir}", "--set", "run.tiny_assets=null", "--set", "run.warm_cache=null",
           "--set", f"actor.model_dir={tiny_assets / 'student'}", "--set", f"actor.prompts_file={tiny_assets / 'prompts.jsonl'}",
           "--set", f"teacher.model_dir={tiny_assets / 'teacher'}", "--set", f"teacher.cache_dir={workdir / 'cache'}",
           "--set", f"learner.model_dir={tiny_assets / 'student'}", "--set", f"learner.workdir={workdir / 'learner'}",
           "--set", "learner.eval.heldout_file=", "--set", "run.fresh=false"]
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            history = workdir / "learner" / "history.jsonl"
            while time.monotonic() < deadline and proc.poll() is None:
                if history.exists() and history.read_text().count("\n") >= 2:
                    break
                time.sleep(0.5)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert history.exists(), "the pipeline never trained a step"
            assert (workdir / "redis" / "appendonlydir").exists(), "the private Redis should run with AOF on"
            assert len(_processes_mentioning(str(workdir))) >= 5  # 2 actors, 1 teacher, 1 learner, redis
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 130, log_path.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(workdir)) == []


def test_a_run_reports_held_out_exact_match(tiny_assets: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "acc-run"
    cmd = [sys.executable, "-m", "opd.cli", "up", "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
           "--no-progress", "--steps", "3",
           "--set", "transport.redis_url=null", "--set", f"run.workdir={workdir}", "--set", "run.tiny_assets=null",
           "--set", "run.warm_cache=null", "--set", f"actor.model_dir={tiny_assets / 'student'}",
           "--set", f"actor.prompts_file={tiny_assets / 'prompts.jsonl'}", "--set", f"teacher.model_dir={tiny_assets / 'teacher'}",
           "--set", f"teacher.cache_dir={workdir / 'cache'}", "--set", f"learner.model_dir={tiny_assets / 'student'}",
           "--set", f"learner.workdir={workdir / 'learner'}", "--set", f"learner.eval.heldout_file={tiny_assets / 'heldout.jsonl'}",
           "--set", f"learner.eval.teacher_dir={tiny_assets / 'teacher'}", "--set", "learner.eval.every=0",
           "--set", "learner.eval.num_prompts=4", "--set", "learner.eval.accuracy_prompts=6",
           "--set", "learner.eval.max_new_tokens=64", "--set", "learner.checkpoint_every=1000"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    evals = [json.loads(x) for x in (workdir / "learner" / "eval.jsonl").read_text().splitlines()]
    assert len(evals) >= 2 and all(r["accuracy_prompts"] == 6 and 0 <= r["correct"] <= 6 for r in evals), evals
    line = re.search(r"held-out exact match \(first -> last\): ([\d.]+)% \((\d)/6, step 0\) -> ([\d.]+)% \((\d)/6, step (\d+)\)",
                     output)
    assert line is not None, output[-4000:]
    assert (int(line[2]), int(line[4]), int(line[5])) == (evals[0]["correct"], evals[-1]["correct"], evals[-1]["step"])
    assert "held-out exact match (first -> last)" in output.split("opd pipeline", 1)[-1]  # the final table's row
    assert (workdir / "summary.png").stat().st_size > 0
