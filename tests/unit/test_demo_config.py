"""`opd demo`'s config (configs/demo-cpu.yaml) is the task demo it says it is, checked without running it.

Why: the demo runs for minutes, so the suite does not run it (tests/integration/test_launcher.py runs the same
launcher on tiny models); a config edit that broke what the demo shows would otherwise be found by a user.
Pins: the demo distills the shipped task student toward the shipped task teacher (paths that exist); its loss
is the exact reverse KL (topk_kl over the whole vocabulary); its horizon starts truncated and reaches the full
budget well before the last step (so training ends on full-length answers); its evaluation measures greedy
exact match with a budget every reference answer fits in (the evaluator would refuse one that does not).
"""

from __future__ import annotations

import random
from pathlib import Path

from opd.cli import DEMO_CONFIG
from opd.config import load_config
from protocol.prompts import load_references
from protocol.state import LearnerState
from protocol.vocab import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_distills_the_task_models_with_the_exact_loss() -> None:
    cfg = load_config(DEMO_CONFIG, [])
    models = REPO / "models" / "task"
    assert Path(cfg.actor.model_dir).resolve() == Path(cfg.learner.model_dir).resolve() == (models / "student").resolve()
    assert Path(cfg.teacher.model_dir).resolve() == Path(cfg.learner.eval.teacher_dir).resolve() == (models / "teacher").resolve()
    for path in (cfg.actor.prompts_file, cfg.learner.eval.heldout_file, cfg.run.warm_cache):
        assert path and Path(path).is_file(), path
    assert cfg.run.tiny_assets is None
    assert cfg.learner.loss.kind == "topk_kl" and cfg.learner.loss.direction == "reverse"
    assert cfg.teacher.topk == len(load_tokenizer(cfg.teacher.model_dir)), "top-k over the whole vocabulary: the exact KL"


def test_the_demo_truncates_then_trains_on_full_answers() -> None:
    cfg = load_config(DEMO_CONFIG, [])
    schedule = cfg.actor.schedule.build(cfg.actor.max_new_tokens)
    rng = random.Random(0)

    def horizon(version: int) -> int:
        return int(schedule.horizon(LearnerState(version=version, step=version, batch_size=1, max_staleness=0), rng))

    assert horizon(0) < cfg.actor.max_new_tokens / 2
    full_from = next(v for v in range(cfg.learner.steps) if horizon(v) == cfg.actor.max_new_tokens)
    assert full_from <= cfg.learner.steps // 2, "at least half the demo should train on full-length answers"


def test_the_demo_measures_exact_match_within_its_budget() -> None:
    cfg = load_config(DEMO_CONFIG, [])
    ev = cfg.learner.eval
    assert ev.accuracy_prompts >= 50 and 0 < ev.every < cfg.learner.steps
    tokenizer = load_tokenizer(cfg.learner.model_dir)
    refs = load_references(ev.heldout_file, limit=ev.accuracy_prompts)
    longest = max(len(tokenizer.encode(r.reference, add_special_tokens=False)) + 1 for r in refs)
    assert longest <= ev.max_new_tokens <= cfg.actor.max_new_tokens
