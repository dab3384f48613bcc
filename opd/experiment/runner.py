"""`opd experiment run`: every (row, seed) through the real pipeline at one compute budget, then evaluated.

For each OPD run the runner builds the row's `opd up` config (the experiment's `pipeline` tree, the row's
schedule / loss / overrides, per-run paths and seeds, `learner.max_flops` = the budget), starts a private
redis-server, and runs the launcher's `run_pipeline` (actors, teachers and learner as processes, exactly
as `opd up`). The learner stops at the budget (protocol/compute.py: generation + teacher + learner FLOPs,
from the run stats every role adds to) and drains; a watcher thread (watch.py) keeps the published weights
at each compute mark. The TRL row runs `trl_baseline.py` in a subprocess with the same budget. Afterwards,
outside the budget, every kept checkpoint is evaluated (evaluate.py) and the report is rewritten (report.py,
plots.py), so a partial experiment still leaves a readable table.

Layout of `<out_dir>/<name>/`: `table.md`, `results.json`, `curves.png`, `horizon.png`, `initial.json` (the
student before training) and `runs/<row>/seed<k>/` (`pipeline.yaml`, `pipeline/` with the roles' logs,
`checkpoints/c<i>/`, `run.json`).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from opd.config import ConfigError, OPDConfig, apply_override, load_config
from opd.experiment.config import ExperimentConfig, RowConfig
from opd.experiment.progress import Reporter

log = logging.getLogger("opd.experiment")
ALL_STEPS = 10**9  # the budget stops the learner, never the step count


@dataclass(frozen=True)
class RunSpec:
    row: RowConfig
    seed: int
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.row.name} seed {self.seed}"


def plan(cfg: ExperimentConfig, results: Path) -> list[RunSpec]:
    """Rows inside seeds: every row's seed k runs before any row's seed k+1.

    An experiment stopped part way (they take hours; `--resume` goes on) then holds the same seeds for every row
    but the last few, so its table compares like with like instead of five seeds of one row against none of another.
    """
    return [RunSpec(row, seed, results / "runs" / row.name / f"seed{seed}") for seed in cfg.seeds for row in cfg.rows]


def pipeline_config(cfg: ExperimentConfig, spec: RunSpec, vocab_size: int) -> OPDConfig:
    """The `opd up` config of one run, written to `<run>/pipeline.yaml` and validated (errors name the row)."""
    tree: dict[str, Any] = copy.deepcopy(cfg.pipeline)
    work = spec.dir / "pipeline"
    fixed = {
        "run.name": f"{spec.row.name}-seed{spec.seed}", "run.workdir": str(work), "run.tiny_assets": None,
        "run.fresh": True, "transport.redis_url": None,
        "actor.model_dir": str(cfg.path("student_dir")), "actor.prompts_file": str(cfg.path("prompts_file")),
        "actor.seed": 1000 * spec.seed, "teacher.model_dir": str(cfg.path("teacher_dir")),
        "teacher.cache_dir": str(work / "cache"), "learner.model_dir": str(cfg.path("student_dir")),
        "learner.workdir": str(work / "learner"), "learner.seed": spec.seed, "learner.steps": ALL_STEPS,
        "learner.max_flops": cfg.budget_flops, "learner.eval.heldout_file": "",
        "learner.max_flops_charges_cache": cfg.charges_cache(spec.row), "actor.probe_truth": spec.row.probe_truth,
    }
    for key, value in fixed.items():
        _put(tree, key, value)
    learner = tree.setdefault("learner", {})
    learner["keep_published"] = max(int(learner.get("keep_published", 3)), 8)  # the watcher copies the newest
    row = spec.row
    if row.schedule is not None:
        _put(tree, "actor.schedule", row.schedule)
    loss = row.loss if row.loss is not None else cfg.loss
    if loss is not None:
        _put(tree, "learner.loss", loss)
    topk = row.teacher_topk if row.teacher_topk is not None else cfg.teacher_topk
    if topk is not None:
        _put(tree, "teacher.topk", vocab_size if topk == "vocab" else topk)
    try:
        for assignment in row.set:
            apply_override(tree, assignment)
        spec.dir.mkdir(parents=True, exist_ok=True)
        path = spec.dir / "pipeline.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return load_config(path)
    except ConfigError as exc:
        raise ValueError(f"rows.{row.name}: {exc}") from None


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def marks_of(cfg: ExperimentConfig) -> list[float]:
    return [cfg.budget_flops * i / cfg.checkpoints for i in range(1, cfg.checkpoints + 1)]


def run_opd(spec: RunSpec, pipe: OPDConfig, marks: list[float], reporter: Reporter, *,
            keep_state: bool = False) -> dict[str, Any]:
    """One pipeline run until the budget; the record of what it spent and the checkpoints it kept.

    A finished run's pipeline state (see `_drop_pipeline_state`) is deleted unless `keep_state`: the record and
    the kept checkpoints are what the experiment reads afterwards, and the state is gigabytes a run on a real
    model. A failed run keeps everything, for its post-mortem."""
    from opd.experiment.watch import Watcher
    from opd.launcher import run_pipeline, start_redis

    work = Path(pipe.run.workdir)
    work.mkdir(parents=True, exist_ok=True)
    redis_proc, pipe.transport.redis_url = start_redis(work)
    watcher = Watcher(pipe, marks, spec.dir / "checkpoints", on_poll=lambda tally, step: reporter.spent(tally, step))
    launcher_log = logging.getLogger("opd.launcher")
    handler = logging.FileHandler(work / "launcher.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    launcher_log.addHandler(handler)
    launcher_log.propagate = False
    code = 1
    try:
        watcher.start()
        with open(work / "launcher.out", "w") as out:
            stdout, sys.stdout = sys.stdout, out  # the launcher's final snapshot table goes to the run's files
            try:
                code = run_pipeline(pipe, progress=False)
            finally:
                sys.stdout = stdout
        result = watcher.finish()
    finally:
        watcher.halt()
        launcher_log.removeHandler(handler)
        handler.close()
        launcher_log.propagate = True
        redis_proc.terminate()
        try:
            redis_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            redis_proc.kill()
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # the experiment was stopped: stop, don't run the next
        raise KeyboardInterrupt(f"{spec.name}: the pipeline was stopped by a signal (exit code {code})")
    if code != 0:
        tail = "\n".join((work / "launcher.log").read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"the pipeline exited with code {code} (logs in {work / 'logs'}):\n{tail}")
    if result.missed:
        raise RuntimeError(f"the run ended before compute marks {result.missed} (see {work / 'launcher.log'})")
    if not keep_state:
        _drop_pipeline_state(work)
    return {"marks": [vars(m) for m in result.marks], "timeline": result.timeline, "wall_s": result.wall_s,
            "steps": result.steps, "stats": result.stats}


PIPELINE_STATE = ("learner/weights", "learner/checkpoints", "cache", "redis")


def _drop_pipeline_state(work: Path) -> None:
    """Delete what only a running pipeline needs: the published weights, the learner's resume checkpoints, the
    teacher cache and Redis's append-only file. On the real pair that is 2.4 GB a run (15 runs: 36 GB), which
    filled a disk once; an experiment run never resumes a pipeline part way (it starts the run again). The
    logs, `history.jsonl` and the other small records stay."""
    freed = 0
    for rel in PIPELINE_STATE:
        path = work / rel
        if path.exists():
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
    log.info("%s: dropped the pipeline's state (%.1f MB: %s; keep_pipeline_state: true keeps it)",
             work, freed / 1e6, ", ".join(PIPELINE_STATE))


def run_trl(cfg: ExperimentConfig, spec: RunSpec, pipe: OPDConfig, marks: list[float],
            reporter: Reporter) -> dict[str, Any]:
    """The TRL baseline in a subprocess; raises `Skipped` where TRL does not import."""
    import importlib.util

    from protocol.runtime import resolve_device

    if importlib.util.find_spec("trl") is None:
        raise Skipped("trl is not installed (pip install -e '.[trl]')")
    spec.dir.mkdir(parents=True, exist_ok=True)
    job = {"out": str(spec.dir), "student_dir": str(cfg.path("student_dir")), "teacher_dir": str(cfg.path("teacher_dir")),
           "prompts_file": str(cfg.path("prompts_file")), "use_chat_template": pipe.actor.use_chat_template,
           "add_bos": pipe.actor.add_bos, "batch_size": pipe.learner.batch_size, "lr": pipe.learner.lr,
           "warmup_steps": pipe.learner.warmup_steps, "grad_clip": pipe.learner.grad_clip,
           "temperature": pipe.actor.temperature, "max_new_tokens": pipe.actor.max_new_tokens, "seed": spec.seed,
           "threads": cfg.trl.threads, "lmbda": cfg.trl.lmbda, "beta": cfg.trl.beta, "marks": marks,
           "device": resolve_device(cfg.trl.device)}
    (spec.dir / "trl_spec.json").write_text(json.dumps(job, indent=2) + "\n")
    log_path = spec.dir / "trl.log"
    cmd = [sys.executable, "-m", "opd.experiment.trl_baseline", str(spec.dir / "trl_spec.json")]
    t0 = time.monotonic()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**_env(), "OMP_NUM_THREADS": str(cfg.trl.threads)})
        while proc.poll() is None:
            if time.monotonic() - t0 > cfg.trl.timeout_s:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"the TRL run took longer than trl.timeout_s={cfg.trl.timeout_s:g} (see {log_path})")
            reporter.trl_progress(log_path)
            time.sleep(1.0)
    lines = log_path.read_text(errors="replace").splitlines()
    if proc.returncode == 3:
        raise Skipped(next((ln for ln in reversed(lines) if ln.startswith("trl baseline unavailable")), lines[-1]))
    if proc.returncode != 0:
        raise RuntimeError(f"the TRL run exited with code {proc.returncode}:\n" + "\n".join(lines[-15:]))
    record = json.loads((spec.dir / "record.json").read_text())
    return {"marks": record["marks"], "timeline": [], "wall_s": record["wall_s"], "steps": record["steps"],
            "stats": {}, "params": record["params"]}


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


class Skipped(Exception):
    """A row that cannot run here (its reason goes into the table)."""
