"""Held-out greedy exact match (`learner.eval.accuracy_prompts`), on the experiment task's shipped models.

Pins:
- a greedy answer counts as right only when it is the reference text exactly and ended with EOS: the
  teacher (100% on the task) is right against the true references and wrong against a reference with one
  character changed, against a reference that stops one line early, and when the token budget cuts it off;
- on the task, the generic rule agrees with the task's own checker (`opd.experiment.task.is_correct`)
  on the warmed-up student's answers, right and wrong ones;
- the learner's evaluator refuses, naming the setting, a held-out line without a reference answer and a
  generation budget shorter than a reference; its eval.jsonl row carries the accuracy only when measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.config import LearnerConfig
from learner.evaluate import EvalResult, HeldoutEvaluator, greedy_exact_match
from opd.experiment import task
from opd.experiment.train import greedy_accuracy
from protocol.prompts import encode_prompt, load_references
from protocol.vocab import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models" / "task"
HELDOUT = MODELS / "heldout.jsonl"


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Token-by-token generation of small models: two threads on a shared 2-core machine are slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return load_tokenizer(str(MODELS / "teacher"))


def _model(name: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32).eval()


def _match(model: torch.nn.Module, tokenizer, prompts: list[str], references: list[str], max_new_tokens: int = 384):  # type: ignore[no-untyped-def]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    return greedy_exact_match(model, tokenizer, ids, references, max_new_tokens=max_new_tokens,
                              pad_id=task.PAD_ID, eos_id=task.EOS_ID, vocab_size=len(tokenizer), batch_size=4)


def test_right_only_when_the_reference_text_is_written_exactly_and_ended(tokenizer) -> None:  # type: ignore[no-untyped-def]
    refs = load_references(HELDOUT, limit=4)
    teacher = _model("teacher")
    true = [r.reference for r in refs]
    assert _match(teacher, tokenizer, [r.prompt for r in refs], true).correct == 4
    changed = true[1][:-1] + ("0" if true[1][-1] != "0" else "1")
    one_line_short = true[2].rsplit("\n", 1)[0]
    result = _match(teacher, tokenizer, [r.prompt for r in refs], [true[0], changed, one_line_short, true[3]])
    assert (result.correct, result.total, result.finished) == (2, 4, 4)
    assert result.mean_tokens == pytest.approx(sum(len(t) + 1 for t in true) / 4)  # one token per character + EOS
    cut = _match(teacher, tokenizer, [r.prompt for r in refs[:2]], true[:2], max_new_tokens=len(true[0]))
    assert (cut.correct, cut.finished) == (0, 0)  # the right text so far, but no EOS yet


def test_agrees_with_the_task_checker_on_the_students_answers(tokenizer) -> None:  # type: ignore[no-untyped-def]
    refs = load_references(HELDOUT, limit=64)
    student = _model("student")
    ours = _match(student, tokenizer, [r.prompt for r in refs], [r.reference for r in refs])
    problems = [task.make_problem(task.number_in_prompt(r.prompt)) for r in refs]
    checker = greedy_accuracy(student, tokenizer, problems, batch_size=16, max_new_tokens=384)
    assert 0 < ours.correct < ours.total, "the warmed-up student should get some but not all of these right"
    assert ours.correct == checker["correct"]
    assert ours.finished / ours.total == checker["finished"]
    assert ours.mean_tokens == pytest.approx(checker["mean_tokens"])


def _config(tmp_path: Path, heldout: Path, **eval_settings: object) -> LearnerConfig:
    return LearnerConfig.model_validate({"model_dir": str(MODELS / "student"), "workdir": str(tmp_path), "eval": {
        "heldout_file": str(heldout), "teacher_dir": str(MODELS / "teacher"), "num_prompts": 2, **eval_settings}})


def test_the_evaluator_measures_accuracy_only_when_asked(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    student = _model("student")
    off = HeldoutEvaluator(_config(tmp_path, HELDOUT, max_new_tokens=8), tokenizer, torch.device("cpu")).run(student)
    assert off.accuracy is None and "accuracy" not in off.row()
    evaluator = HeldoutEvaluator(_config(tmp_path, HELDOUT, max_new_tokens=384, accuracy_prompts=3), tokenizer,
                                 torch.device("cpu"))
    row = evaluator.run(_model("teacher")).row()  # the teacher as the student: every answer right
    assert (row["accuracy"], row["correct"], row["accuracy_prompts"], row["finished"]) == (1.0, 3, 3, 1.0)


def test_the_evaluator_refuses_what_could_never_match(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    lines = [json.loads(x) for x in HELDOUT.read_text().splitlines()[:3]]
    del lines[1]["continuation"]
    bad = tmp_path / "no-reference.jsonl"
    bad.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError, match=r"no-reference.jsonl:2: learner.eval.accuracy_prompts needs a reference"):
        HeldoutEvaluator(_config(tmp_path, bad, max_new_tokens=384, accuracy_prompts=3), tokenizer, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"learner.eval.max_new_tokens \(100\) is shorter than the reference answer"):
        HeldoutEvaluator(_config(tmp_path, HELDOUT, max_new_tokens=100, accuracy_prompts=3), tokenizer, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"accuracy_prompts is 500 but .* has only 200 prompts"):
        HeldoutEvaluator(_config(tmp_path, HELDOUT, max_new_tokens=384, accuracy_prompts=500), tokenizer,
                         torch.device("cpu"))


def test_a_result_row_without_accuracy_has_no_accuracy_keys() -> None:
    assert set(EvalResult(reverse_kl=0.5, tokens=10, mean_response_len=5.0).row()) == {
        "reverse_kl", "tokens", "mean_response_len"}
