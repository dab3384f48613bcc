"""`opd experiment premise` on the shipped task models (models/task, ~1M parameters: seconds).

Pins the arithmetic the premise table rests on: the buckets' gradients, weighted by their token counts, add
up to the gradient over every response token (the buckets split one loss, nothing is counted twice or lost);
a gradient is a deterministic function of the checkpoint and the sampling seed (so a consistency below 1 is
the draw of the samples, not the code); `--topk` over the whole vocabulary is the exact KL again, a small k
another gradient; and one measurement gives a cosine in [-1, 1] per non-empty bucket.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from opd.experiment.config import load_experiment
from opd.experiment.positions import bucket_names
from opd.experiment.premise import _cos, _Meter, markdown, plot, run_premise

REPO = Path(__file__).resolve().parents[2]
EDGES = (0, 40, 100, 200)


@pytest.fixture(scope="module")
def meter(tmp_path_factory: pytest.TempPathFactory) -> _Meter:
    cfg = load_experiment(REPO / "configs" / "experiment-truncation.yaml", quick=True)
    cfg = cfg.model_copy(update={"out_dir": str(tmp_path_factory.mktemp("exp")),
                                 "eval": cfg.eval.model_copy(update={"kl_prompts": 2, "accuracy_prompts": 0})})
    return _Meter(cfg, EDGES, rollouts=4, heldout=2)


def test_bucket_gradients_add_up_to_the_whole_and_repeat(meter: _Meter) -> None:
    student = meter.ev.load_student(REPO / "models" / "task" / "student")
    prompts = meter.train_prompts[:3]
    parts, counts = meter._bucket_grads(student, prompts, seed=5)
    whole, (total,) = meter._bucket_grads(student, prompts, seed=5, whole=True)
    assert len(parts) == len(EDGES) and sum(counts) == total > 200  # answers of 138+ tokens: several buckets
    combined = sum(g * n for g, n in zip(parts, counts, strict=True) if g is not None) / total
    assert torch.allclose(combined, whole[0], rtol=1e-4, atol=1e-7)
    again, _ = meter._bucket_grads(student, prompts, seed=5)
    assert _cos(parts[0], again[0]) > 1 - 1e-6
    other, _ = meter._bucket_grads(student, prompts, seed=6)  # other samples: another gradient
    assert _cos(parts[0], other[0]) < 1 - 1e-3


def test_topk_over_the_whole_vocabulary_is_the_exact_kl(meter: _Meter) -> None:
    student = meter.ev.load_student(REPO / "models" / "task" / "student")
    prompts = meter.train_prompts[:2]
    exact, counts = meter._bucket_grads(student, prompts, seed=5)
    try:
        meter.topk = meter.ev.vocab_size  # every id in the support, the tail bucket empty
        everything, counts_k = meter._bucket_grads(student, prompts, seed=5)
        meter.topk = 2
        two, _ = meter._bucket_grads(student, prompts, seed=5)
        whole_two, _ = meter._bucket_grads(student, prompts, seed=5, whole=True)
    finally:
        meter.topk = 0
    whole, _ = meter._bucket_grads(student, prompts, seed=5, whole=True)
    assert counts == counts_k
    assert _cos(exact[0], everything[0]) > 1 - 1e-5 and _cos(exact[0], two[0]) < 0.999
    assert _cos(whole[0], whole_two[0]) > 1 - 1e-6  # g_H is always the exact KL's


def test_one_measurement_and_its_report(meter: _Meter, tmp_path: Path) -> None:
    got = meter.measure(str(REPO / "models" / "task" / "student"), seed=0)
    assert len(got["alignment"]) == len(got["consistency"]) == len(got["tokens"]) == len(EDGES)
    for a, c, n in zip(got["alignment"], got["consistency"], got["tokens"], strict=True):
        assert (n == 0) == (a != a)  # nan exactly where the bucket is empty
        assert n == 0 or (-1 <= a <= 1 and -1 <= c <= 1)
    points = [{"seed": 0, "mark": 0, "flops": 0.0, "step": 0, **got}, {"seed": 0, "mark": 1, "flops": 1.0, "step": 3, **got}]
    text = markdown(points, EDGES, "CMD", "full")
    assert "CMD" in text and all(f"align {h}" in text for h in bucket_names(EDGES)) and "| 1 | 3 |" in text
    plot(points, EDGES, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_without_a_finished_experiment_it_says_what_to_run(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    tree = {"name": "x", "out_dir": str(tmp_path / "out"), "models_dir": str(REPO / "models" / "task"),
            "budget_flops": 1.0, "rows": [{"name": "full", "schedule": "full"}]}
    cfg.write_text(json.dumps(tree))
    args = argparse.Namespace(config=str(cfg), quick=False, preset=None, row=None, seeds="0", marks=None, edges="0,40",
                              rollouts=4, heldout=2, topk=0)
    with pytest.raises(FileNotFoundError, match="run `opd experiment run`"):
        run_premise(args)
    with pytest.raises(ValueError, match="--edges 40,0"):
        run_premise(argparse.Namespace(**{**vars(args), "edges": "40,0"}))
