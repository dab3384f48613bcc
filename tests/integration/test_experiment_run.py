"""`opd experiment run --quick`, for real, at a tiny budget: the pipeline stops at the budget, the compute
accounting adds up, and the table, JSON and plots are written.

Tiny task-shaped models (random Llamas with the binary task's character tokenizer, a few thousand
parameters) stand in for the shipped ones; two OPD rows (full, a fixed 25% horizon), one seed, two compute
marks, and the TRL row (trl is in the test extras: it must run, not skip).

Pins:
- each run's learner stopped because the run's FLOPs reached the budget (`learner.max_flops`), not its steps;
- the run stats' FLOPs are the formula applied to the token counters the roles wrote (generation 2 N_s per
  prompt + generated token, teacher 2 N_t per forwarded token, learner 6 N_s per trained token), the
  counters match what happened (teacher cache off: the teacher forwarded exactly every prompt + generated
  token; the learner's trained response tokens and steps are its history's), and parts sum to the total;
- checkpoints are kept at the marks (the FLOPs spent there at or past the mark) and evaluated;
- table.md, results.json, curves.png and horizon.png exist, the table names every row, with bootstrap intervals
  over seeds and problems (each checkpoint's evaluation records per-problem results) and a verdict.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 40
BATCH = 8


def _models(root: Path) -> tuple[int, int, int]:
    """Student and teacher dirs, prompts and held-out files under `root`; (N_s, N_t, longest prompt)."""
    import torch

    from opd.experiment import task
    from opd.experiment.train import ModelSpec, make_model, num_parameters

    torch.manual_seed(0)
    tokenizer = task.build_tokenizer()
    counts = []
    for name, spec in (("student", ModelSpec(16, 1, 2, 32)), ("teacher", ModelSpec(32, 2, 2, 64))):
        model = make_model(spec, len(tokenizer))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        counts.append(num_parameters(model))
    task.write_jsonl(root / "prompts.jsonl", task.generate(1, 64))
    task.write_jsonl(root / "heldout.jsonl", task.generate(2, 8))
    longest = max(len(p.prompt) for p in task.generate(1, 64))
    return counts[0], counts[1], longest


def _config(root: Path, budget: float) -> Path:
    cfg = {
        "name": "tiny", "out_dir": str(root / "out"), "models_dir": str(root), "budget_flops": budget,
        "checkpoints": 3, "seeds": [0, 1], "loss": "topk_kl", "teacher_topk": "vocab",
        "eval": {"kl_prompts": 4, "accuracy_prompts": 4, "batch_size": 4},
        "pipeline": {
            "run": {"actors": 1, "teachers": 1},
            "actor": {"batch_size": 4, "max_new_tokens": MAX_NEW, "probe_fraction": 0.25, "weights_poll_s": 0.2},
            "teacher": {"batch_size": 8, "cache_enabled": False},
            "learner": {"batch_size": BATCH, "lr": 1e-3, "max_staleness": 2, "checkpoint_every": 1000},
        },
        "rows": [{"name": "full", "schedule": "full"},
                 {"name": "topd", "schedule": {"kind": "fixed", "fraction": 0.25}},
                 {"name": "trl", "kind": "trl"}],
        "quick": {"rows": ["full", "topd", "trl"], "seeds": [0], "checkpoints": 2},
    }
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_quick_experiment_at_a_tiny_budget(tmp_path: Path) -> None:
    n_s, n_t, longest_prompt = _models(tmp_path)
    budget = 6 * BATCH * (8 * n_s + 2 * n_t) * (longest_prompt + MAX_NEW)  # ~6 full-rollout steps
    proc = subprocess.run([sys.executable, "-m", "opd.cli", "experiment", "run", "--config",
                           str(_config(tmp_path, budget)), "--quick", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "out" / "tiny-quick"
    data = json.loads((results / "results.json").read_text())
    runs = {r["row"]: r for r in data["runs"]}
    assert set(runs) == {"full", "topd", "trl"}
    for row in ("full", "topd"):
        _check_accounting(runs[row], n_s, n_t, budget, results / "runs" / row / "seed0")
    trl = runs["trl"]
    assert trl["status"] == "ok", trl  # trl is in the test extras: the row runs, it does not skip
    assert [c["index"] for c in trl["checkpoints"]] == [0, 1, 2]
    assert "reverse_kl" in trl["checkpoints"][-1]["eval"]
    # per-problem exact match and per-prompt KL are recorded, so the bootstrap resamples problems too
    last = runs["full"]["checkpoints"][-1]["eval"]
    assert len(last["correct_by_problem"]) == 4 and len(last["kl_by_prompt"]["kl_sum"]) == 4
    assert data["summary"]["per_problem"] and runs["full"]["charge_cache"] is True
    table = (results / "table.md").read_text()
    assert "| full |" in table and "| topd |" in table and "| trl |" in table and "exact match" in table
    assert "bootstrap interval over seeds and held-out problems" in table and "Verdict:" in table
    for png in ("curves.png", "horizon.png"):
        assert (results / png).stat().st_size > 1000
    assert "table, JSON and plots in" in proc.stdout

    # `opd experiment positions`: the kept checkpoints' KL by response position, per row, beside the table
    proc = subprocess.run([sys.executable, "-m", "opd.cli", "experiment", "positions", "--config",
                           str(tmp_path / "experiment.yaml"), "--quick", "--edges", "0,2,4"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    positions = (results / "positions.md").read_text()
    assert "| 0-1 | 2-3 | 4+ |" in positions and "| start (before training) | 1 |" in positions
    assert "| full | 1 |" in positions and "| topd | 1 |" in positions
    assert (results / "positions.png").stat().st_size > 1000


def _check_accounting(run: dict, n_s: int, n_t: int, budget: float, run_dir: Path) -> None:
    assert run["status"] == "ok", run.get("reason")
    s = run["stats"]
    prompt, generated = s["actor_prompt_tokens"], s["actor_tokens_generated"]
    assert prompt > 0 and generated > 0
    assert s["flops_generation"] == pytest.approx(2 * n_s * (prompt + generated))
    assert s["teacher_tokens_forwarded"] == prompt + generated  # cache off: every sequence, once
    assert s["flops_teacher"] == pytest.approx(2 * n_t * s["teacher_tokens_forwarded"])
    assert s["flops_learner"] == pytest.approx(6 * n_s * s["learner_tokens"])
    history = [json.loads(line) for line in (run_dir / "pipeline" / "learner" / "history.jsonl").read_text().splitlines()]
    assert s["learner_steps"] == len(history) == run["steps"]
    assert s["learner_response_tokens"] == sum(h["tokens"] for h in history)
    assert s["learner_tokens"] > s["learner_response_tokens"]  # prompts are forwarded too
    total = s["flops_generation"] + s["flops_teacher"] + s["flops_learner"]
    assert total >= budget
    learner_log = (run_dir / "pipeline" / "logs" / "learner-0.log").read_text()
    assert "spent the compute budget" in learner_log
    # the finished run's pipeline state is gone (keep_pipeline_state: false), its records and logs stay
    for rel in ("learner/weights", "learner/checkpoints", "cache", "redis"):
        assert not (run_dir / "pipeline" / rel).exists(), rel
    checkpoints = run["checkpoints"]
    assert [c["index"] for c in checkpoints] == [0, 1, 2]
    for c in checkpoints:
        parts = c["flops"]
        assert parts["total"] == pytest.approx(parts["generation"] + parts["teacher"] + parts["learner"])
        assert parts["total"] >= c["mark_flops"]
        assert set(c["eval"]) >= {"reverse_kl", "accuracy", "finished"}
    assert checkpoints[-1]["mark_flops"] == pytest.approx(budget)
    assert checkpoints[-1]["flops"]["total"] <= total


def test_a_stopped_experiment_stops_instead_of_starting_the_next_run(tmp_path: Path) -> None:
    """SIGTERM to `opd experiment run` mid-run: the launcher stops the roles and the experiment exits (130),
    recording nothing for the interrupted run (so --resume redoes it) and starting no other run."""
    import os
    import signal
    import time

    n_s, n_t, longest_prompt = _models(tmp_path)
    budget = 10_000 * BATCH * (8 * n_s + 2 * n_t) * (longest_prompt + MAX_NEW)  # far more than the test waits
    proc = subprocess.Popen([sys.executable, "-m", "opd.cli", "experiment", "run", "--config",
                             str(_config(tmp_path, budget)), "--quick", "--no-progress"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = tmp_path / "out" / "tiny-quick" / "runs" / "full" / "seed0"
    deadline = time.monotonic() + 300
    while not list((first / "pipeline").glob("learner/**/*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    assert not (first / "run.json").exists()
    assert not (tmp_path / "out" / "tiny-quick" / "runs" / "topd" / "seed0" / "pipeline").exists(), out[-3000:]
