"""The TRL baseline warms its learning rate up exactly as the learner does (issue 17, item 8).

transformers' `constant_with_warmup` gives step 0 a rate of 0 (`step / warmup`); the learner's warm-up gives it
lr / warmup (`(step + 1) / warmup`, learner/step.py `warmup_factor`). With TRL's schedule the baseline lost a
step of training against every OPD row. Here TRL's real `GKDTrainer` trains a tiny task-shaped student for a
few steps (trl is in the `test` extras) and the rate of each of its first steps must be the learner's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

WARMUP, LR, BATCH, MAX_NEW = 3, 1e-3, 4, 8


def _models(root: Path) -> tuple[int, int, int]:
    import torch

    from opd.experiment import task
    from opd.experiment.train import ModelSpec, make_model, num_parameters

    torch.manual_seed(0)
    tokenizer = task.build_tokenizer()
    counts = []
    for name, spec in (("student", ModelSpec(16, 1, 2, 32)), ("teacher", ModelSpec(32, 1, 2, 64))):
        model = make_model(spec, len(tokenizer))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        counts.append(num_parameters(model))
    problems = task.generate(1, 32)
    task.write_jsonl(root / "prompts.jsonl", problems)
    return counts[0], counts[1], max(len(p.prompt) for p in problems)


def test_trl_baseline_warm_up_matches_the_learner(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="trl is in the test extras: pip install -e '.[test]'")
    from learner.step import warmup_factor
    from opd.experiment.trl_baseline import run

    n_s, n_t, longest = _models(tmp_path)
    per_step = BATCH * (8 * n_s + 2 * n_t) * (longest + MAX_NEW)  # the most one step can cost
    spec = {"out": str(tmp_path / "out"), "student_dir": str(tmp_path / "student"),
            "teacher_dir": str(tmp_path / "teacher"), "prompts_file": str(tmp_path / "prompts.jsonl"),
            "use_chat_template": None, "add_bos": None, "batch_size": BATCH, "lr": LR, "warmup_steps": WARMUP,
            "grad_clip": 1.0, "temperature": 1.0, "max_new_tokens": MAX_NEW, "seed": 0, "threads": 1, "lmbda": 1.0,
            "beta": 1.0, "marks": [5 * per_step], "device": "cpu"}
    record = run(spec)
    assert record["steps"] >= WARMUP + 1
    expected = [LR * warmup_factor(s, WARMUP) for s in range(WARMUP + 1)]
    assert record["lrs"][:WARMUP + 1] == pytest.approx(expected)
    assert record["lrs"][0] == pytest.approx(LR / WARMUP)  # not 0: the first step trains
