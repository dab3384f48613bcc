"""The task's shipped teacher and student (models/task) and the command that makes them.

What these tests prove, and what they do not:
- the shipped weight files are exactly the ones the recorded run saved (sha256 in build_info.json);
- today's code path (data split, initialisation, batch order, optimizer, lr schedule, model shape)
  retraces the recorded run's first FINGERPRINT_STEP steps: per-tensor sums and sums of squares
  match the fingerprint the run recorded at that step (with a tolerance, so a CPU whose kernels
  round differently still passes, while any change to the recipe does not);
- the shipped teacher answers held-out problems exactly, and the shipped student's recorded
  start is weak but not random;
- the data files are the split of the recorded seed, and the pipeline's prompt loader reads them.
They do NOT rerun the whole recipe (minutes of CPU). `OPD_REPRODUCE_TASK_MODELS=1` runs
`opd experiment train-teacher` and `train-student` in full and compares the final weights' sha256
with the shipped ones (bit-identical on this kind of CPU and thread-count independent here; another
CPU may differ in the last bits, then compare `heldout.accuracy` in the two build_info files).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.prompts import load_prompts
from opd.cli import main
from opd.config import load_config
from opd.experiment import build, task
from opd.experiment.train import greedy_accuracy, weights_fingerprint

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "task"
ROLES = ("teacher", "student")


@pytest.fixture(scope="module")
def info() -> dict[str, dict[str, object]]:
    return json.loads((SHIPPED / "build_info.json").read_text())


@pytest.mark.parametrize("role", ROLES)
def test_shipped_weights_are_the_recorded_run(role: str, info: dict[str, dict[str, object]]) -> None:
    model = AutoModelForCausalLM.from_pretrained(SHIPPED / role)
    assert weights_fingerprint(model)["sha256"] == info[role]["final_sha256"]
    assert (SHIPPED / role / "model.safetensors").stat().st_size < 8 * 2**20


def _close(a: list[float], b: list[float]) -> bool:
    return math.isclose(a[1], b[1], rel_tol=1e-4, abs_tol=1e-6) and abs(a[0] - b[0]) <= 1e-4 * (1 + math.sqrt(b[1]))


@pytest.mark.parametrize("role", ROLES)
def test_code_retraces_the_recorded_run(role: str, info: dict[str, dict[str, object]]) -> None:
    rec = info[role]
    split = build.make_split(0, student_examples=int(rec["examples"]))  # type: ignore[call-overload]
    model_spec, train_spec = (build.TEACHER_MODEL, build.TEACHER_TRAIN) if role == "teacher" else (
        build.STUDENT_MODEL, build.STUDENT_TRAIN)
    assert {"model": rec["model"], "train": rec["train"]} == build.spec_dict(model_spec, train_spec)
    pool = split.teacher_pool if role == "teacher" else split.student_pool
    _, _, short = build.fit(role, model_spec, replace(train_spec, steps=build.FINGERPRINT_STEP), pool,
                            seed=int(rec["seed"]), threads=1, progress=None)  # type: ignore[call-overload]
    got, want = short["weights_fingerprint"], rec["weights_fingerprint"]
    assert isinstance(got, dict) and isinstance(want, dict)
    assert got["summary"].keys() == want["summary"].keys()
    differing = [k for k in want["summary"] if not _close(got["summary"][k], want["summary"][k])]
    assert not differing, f"{role}: the code no longer retraces the recorded run: {differing[:3]}"


def test_shipped_teacher_answers_exactly_and_student_starts_weak(info: dict[str, dict[str, object]]) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(SHIPPED / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED / "teacher")
    heldout = build.make_split(0).heldout
    two_digit = [p for p in heldout if p.n < 100][:8]  # the shortest prompts: one batch, a few seconds
    assert greedy_accuracy(teacher, tokenizer, two_digit)["accuracy"] == 1.0
    assert info["teacher"]["heldout"]["accuracy"] >= 0.95  # type: ignore[index]
    assert 0.05 <= info["student"]["heldout"]["accuracy"] <= 0.30  # type: ignore[index]
    assert info["student"]["parameters"] < info["teacher"]["parameters"] / 4  # type: ignore[operator]


def test_shipped_data_is_the_seeds_split_and_the_pipeline_reads_it() -> None:
    split = build.make_split(0)
    for name, problems in (("prompts.jsonl", split.pipeline), ("heldout.jsonl", split.heldout)):
        lines = [json.loads(line) for line in (SHIPPED / name).read_text().splitlines()]
        assert lines == [{"prompt": p.prompt, "continuation": p.answer, "answer": p.target} for p in problems]
    assert not {p.n for p in split.heldout} & {p.n for p in split.pipeline + split.teacher_pool + split.student_pool}
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED / "student")
    ids = load_prompts(SHIPPED / "prompts.jsonl", tokenizer)
    assert ids[0] == tokenizer.encode(split.pipeline[0].prompt, add_special_tokens=False)  # no BOS added
    cfg = load_config(REPO / "configs" / "experiment-task.yaml", [])
    assert cfg.actor.max_new_tokens >= task.MAX_BITS * task.LINE_CHARS
    for path in (cfg.actor.model_dir, cfg.actor.prompts_file, cfg.teacher.model_dir, cfg.learner.eval.heldout_file):
        assert (REPO / path).exists(), path


def test_command_writes_models_data_and_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "task"
    args = ["experiment", "train-student", "--out", str(out), "--steps", "6", "--examples", "8",
            "--eval-problems", "2", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("student: 0.14M params, 6 steps") and "held-out greedy exact match" in last
    rec = json.loads((out / "build_info.json").read_text())["student"]
    assert rec["heldout"]["total"] == 2 and rec["fingerprint_step"] == build.FINGERPRINT_STEP
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    assert weights_fingerprint(model)["sha256"] == rec["final_sha256"]
    assert AutoTokenizer.from_pretrained(out / "student").bos_token_id is None
    assert (out / "heldout.jsonl").read_text() == (SHIPPED / "heldout.jsonl").read_text()  # same seed, same split
    assert main(args) == 0  # deterministic: the same command gives the same weights
    assert json.loads((out / "build_info.json").read_text())["student"]["final_sha256"] == rec["final_sha256"]


def test_command_refuses_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "train-teacher", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("OPD_REPRODUCE_TASK_MODELS"),
                    reason="minutes of CPU: set OPD_REPRODUCE_TASK_MODELS=1 to rerun the full recipe")
def test_full_command_reproduces_shipped_models(tmp_path: Path, info: dict[str, dict[str, object]]) -> None:
    for role in ROLES:
        assert main(["experiment", f"train-{role}", "--out", str(tmp_path), "--no-progress"]) == 0
        rec = json.loads((tmp_path / "build_info.json").read_text())[role]
        assert rec["final_sha256"] == info[role]["final_sha256"], role
