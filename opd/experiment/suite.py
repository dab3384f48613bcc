"""The whole experiment: plan every (row, seed), run each at the budget, evaluate its checkpoints, report.

Every row's pipeline config is built and validated before the first run starts, so a typo in the last row
fails in seconds, not after an hour. Runs go one at a time (they would compete for the same cores and
distort each other's wall-clock); evaluation happens between runs, in this process, outside the budget.
A run that fails is recorded with its reason and the experiment goes on; the exit code is 1 if any failed.
`--resume` reuses the runs a previous invocation finished (their `run.json`), for an interrupted experiment.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from opd.experiment import plots, report
from opd.experiment.config import ExperimentConfig
from opd.experiment.progress import Reporter
from opd.experiment.runner import RunSpec, Skipped, marks_of, pipeline_config, plan, run_opd, run_trl
from protocol.compute import format_flops


def check_inputs(cfg: ExperimentConfig) -> None:
    """The models and prompt files exist (with the command that makes the task's)."""
    for key in ("student_dir", "teacher_dir", "prompts_file", "heldout_file"):
        path = cfg.path(key)  # type: ignore[arg-type]
        if not path.exists():
            raise FileNotFoundError(f"{key}: {path} does not exist (the task's models and prompts: "
                                    "`opd experiment train-teacher` and `opd experiment train-student`)")


def run_experiment(cfg: ExperimentConfig, *, command: str, preset: str | None, resume: bool = False, dry_run: bool = False,
                   plain: bool = False) -> int:
    from protocol.vocab import load_tokenizer, shared_vocab_size

    check_inputs(cfg)
    results = Path(cfg.out_dir) / cfg.name
    vocab = shared_vocab_size(load_tokenizer(str(cfg.path("student_dir"))))
    specs = plan(cfg, results)
    pipes = [pipeline_config(cfg, spec, vocab) for spec in specs]
    if dry_run:
        print(f"{len(specs)} runs, budget {format_flops(cfg.budget_flops)} each, {cfg.checkpoints} compute marks; "
              f"results in {results}")
        for spec, pipe in zip(specs, pipes, strict=True):
            what = ("TRL GKDTrainer" if spec.row.kind == "trl" else
                    f"schedule {pipe.actor.schedule.kind}, loss {pipe.learner.loss.kind}, teacher.topk {pipe.teacher.topk}")
            print(f"  {spec.name}: {what}")
        return 0
    results.mkdir(parents=True, exist_ok=True)
    marks = marks_of(cfg)
    records: list[dict[str, Any]] = []
    with Reporter(total_runs=len(specs), budget=cfg.budget_flops, plain=plain) as reporter:
        reporter.log(f"results in {results}; loading the teacher and held-out prompts for evaluation")
        evaluator = evaluator_for(cfg, pipes[0])
        initial = _initial(cfg, evaluator, results, reporter)
        for i, spec in enumerate(specs):
            record = _load(spec) if resume else None
            if record is None:
                reporter.start_run(spec.name, i)
                record = _run(cfg, spec, pipes[i], marks, reporter)
                if record["status"] == "ok":
                    _evaluate(cfg, record, initial, evaluator, reporter, spec)
                (spec.dir / "run.json").write_text(json.dumps(record, indent=1) + "\n")
            records.append(record)
            reporter.end_run(_line(spec, record))
            summary = report.aggregate(cfg, records, preset=preset, command=command)
            report.write(results, summary, records)
            plots.plot_curves(summary, results / "curves.png")
            plots.plot_horizon(summary, records, results / "horizon.png")
    print(report.markdown(summary))
    print(f"table, JSON and plots in {results}")
    return 1 if any(r["status"] == "failed" for r in records) else 0


def evaluator_for(cfg: ExperimentConfig, pipe: Any) -> Any:
    """The held-out evaluator of an experiment (`run` and `positions` both measure with it)."""
    from opd.experiment.evaluate import Evaluator

    return Evaluator(cfg.eval, teacher_dir=cfg.path("teacher_dir"), heldout_file=cfg.path("heldout_file"),
                     max_new_tokens=cfg.eval.max_new_tokens or pipe.actor.max_new_tokens,
                     use_chat_template=pipe.actor.use_chat_template, add_bos=pipe.actor.add_bos, threads=cfg.threads,
                     student_dir=cfg.path("student_dir"))


def _initial(cfg: ExperimentConfig, evaluator: Any, results: Path, reporter: Reporter) -> dict[str, Any]:
    """The student before training (checkpoint 0 of every run), evaluated once."""
    path = results / "initial.json"
    # "per_problem": an initial.json from before the evaluator recorded per-problem results is evaluated again
    # (without them every run's checkpoint 0 would lack them and the bootstrap could not resample problems)
    key = {"student_dir": str(cfg.path("student_dir")), "eval": cfg.eval.model_dump(), "per_problem": True}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return dict(saved["eval"])
    reporter.log("evaluating the student before training")
    result = evaluator.evaluate(cfg.path("student_dir"))
    path.write_text(json.dumps({"key": key, "eval": result}, indent=1) + "\n")
    return result


def _run(cfg: ExperimentConfig, spec: RunSpec, pipe: Any, marks: list[float], reporter: Reporter) -> dict[str, Any]:
    """One run, as a record: status ok / skipped / failed (with the reason)."""
    base = {"row": spec.row.name, "label": spec.row.label or spec.row.name, "kind": spec.row.kind, "seed": spec.seed,
            "budget_flops": cfg.budget_flops, "charge_cache": cfg.charges_cache(spec.row) and spec.row.kind == "opd"}
    shutil.rmtree(spec.dir / "checkpoints", ignore_errors=True)
    try:
        if spec.row.kind == "trl":
            got = run_trl(cfg, spec, pipe, marks, reporter)
        else:
            got = run_opd(spec, pipe, marks, reporter, keep_state=cfg.keep_pipeline_state)
    except Skipped as exc:
        return {**base, "status": "skipped", "reason": str(exc), "checkpoints": []}
    except (RuntimeError, OSError, ValueError) as exc:
        return {**base, "status": "failed", "reason": f"{type(exc).__name__}: {exc}", "checkpoints": []}
    marks_kept = got.pop("marks")
    return {**base, "status": "ok", "reason": None, **got, "checkpoints": marks_kept}


def _evaluate(cfg: ExperimentConfig, record: dict[str, Any], initial: dict[str, Any], evaluator: Any,
              reporter: Reporter, spec: RunSpec) -> None:
    """Every kept checkpoint, evaluated in place; checkpoint 0 (the initial student) prepended."""
    zero = {"generation": 0.0, "teacher": 0.0, "learner": 0.0, "total": 0.0}
    kept = record["checkpoints"]
    for c in kept:
        reporter.log(f"{spec.name}: evaluating checkpoint {c['index']}/{len(kept)} "
                     f"({format_flops(c['flops']['total'])}, learner step {c['step']})")
        c["eval"] = evaluator.evaluate(c["weights"])
        if not cfg.keep_weights:
            shutil.rmtree(c["weights"], ignore_errors=True)
    record["checkpoints"] = [{"index": 0, "mark_flops": 0.0, "flops": zero, "wall_s": 0.0, "step": 0, "version": 0,
                              "weights": str(cfg.path("student_dir")), "eval": initial}, *kept]


def _load(spec: RunSpec) -> dict[str, Any] | None:
    path = spec.dir / "run.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("status") in ("ok", "skipped") else None


def _line(spec: RunSpec, record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"{spec.name}: {record['status']}: {record['reason']}"
    first, last = record["checkpoints"][0]["eval"], record["checkpoints"][-1]["eval"]
    acc = (f"; accuracy {100 * first['accuracy']:.1f}% -> {100 * last['accuracy']:.1f}%"
           if "accuracy" in first and "accuracy" in last else "")
    return (f"{spec.name}: {record['steps']} steps, {format_flops(record['checkpoints'][-1]['flops']['total'])} "
            f"in {record['wall_s']:.0f} s; reverse KL {first['reverse_kl']:.3f} -> {last['reverse_kl']:.3f}{acc}")
