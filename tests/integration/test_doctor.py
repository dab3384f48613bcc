"""`opd doctor`: the pre-flight page, on the task models and the real pair.

Pins that a sound config passes every check with the student-as-its-own-teacher loss ~0 and the engine's
logprobs equal to the learner's, and that the mistakes it exists for fail, each named: a learner that starts
from other weights than the actors sample with, a prompt + answer longer than the models' context, a missing
model dir, and (real pair) a chat template whose end of turn is not a stop id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo-cpu.yaml"


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "opd.cli", "doctor", "--config", str(DEMO), "--prompts", "2", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def lines(out: str, level: str, check: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"[{level:>4}] {check}")]


def test_a_sound_config_passes_with_self_distillation_at_zero() -> None:
    proc = doctor()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    selfs = lines(proc.stdout, "ok", "self-distillation")
    assert len(selfs) == 2 and "of the student against itself" in selfs[0], proc.stdout
    assert float(selfs[0].split("itself: ")[1].split()[0]) < 1e-3
    assert lines(proc.stdout, "info", "first batch") and "doctor: no check failed" in proc.stdout


def test_a_learner_on_other_weights_than_the_actors_fails() -> None:
    proc = doctor("--set", f"learner.model_dir={REPO / 'models' / 'task' / 'teacher'}")
    assert proc.returncode == 1, proc.stdout
    fails = lines(proc.stdout, "FAIL", "self-distillation")
    assert any("expected ~0" in f for f in fails) and any("importance ratio" in f for f in fails), proc.stdout


def test_an_answer_past_the_context_and_a_missing_model_fail_before_the_roles_run() -> None:
    proc = doctor("--set", "actor.max_new_tokens=100000")
    assert proc.returncode == 1 and "exceeds actor.model_dir's context" in proc.stdout, proc.stdout
    assert "not run: mend the failures above first" in proc.stdout and "self-distillation" not in proc.stdout
    proc = doctor("--set", "actor.model_dir=/nonexistent/student")
    assert proc.returncode == 1 and lines(proc.stdout, "FAIL", "inputs"), proc.stdout
    assert "actor.model_dir: /nonexistent/student does not exist" in proc.stdout


@pytest.mark.slow
def test_the_real_pairs_end_of_turn_is_a_stop_and_a_copy_where_it_is_not_fails(pair: Path, tmp_path: Path) -> None:
    from opd.config import load_config
    from opd.doctor import Report, check_stops, end_of_turn
    from protocol.vocab import load_tokenizer

    tok = load_tokenizer(pair / "student")
    assert end_of_turn(tok) == 2  # <|im_end|>
    report = Report()
    assert check_stops(report, load_config(None, [f"actor.model_dir={pair / 'student'}"]), tok) == [2]
    assert not report.failed
    other = tmp_path / "student"  # a checkpoint that stops on <|endoftext|> only: chat answers never end
    other.mkdir()
    for f in (pair / "student").iterdir():
        if f.name not in ("generation_config.json", "tokenizer_config.json"):
            (other / f.name).symlink_to(f)
    for name, key in (("generation_config.json", "eos_token_id"), ("tokenizer_config.json", "eos_token")):
        config = json.loads((pair / "student" / name).read_text())
        (other / name).write_text(json.dumps({**config, key: 0 if key == "eos_token_id" else "<|endoftext|>"}))
    report = Report()
    check_stops(report, load_config(None, [f"actor.model_dir={other}"]), load_tokenizer(other))
    assert report.failed and "'<|im_end|>', which is not a stop id" in report.lines[-1][2]
