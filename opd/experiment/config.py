"""The experiment's configuration (`configs/experiment-*.yaml`): rows, seeds, the compute budget, evaluation.

One file describes the whole comparison. `pipeline` is an ordinary `opd up` config tree shared by every OPD
row; a row changes only what it compares (its truncation schedule, its loss, the teacher's top-k, any other
`--set`-style key), so two rows differ in exactly what their names say. The runner fills in what must differ
per run (model paths, work dirs, seeds, the budget) and validates every row's config before anything starts.

A preset (`presets.<name>`, run with `--preset <name>`) replaces rows, seeds, budget and evaluation sizes: a
subset of the comparison that answers one question in less time. `quick` is the preset `--quick` runs (what
fits this 2-core machine in under 30 minutes); the report says which preset, rows and seeds it ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocol.files import UserPath

ROW_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class RowConfig(BaseModel):
    """One line of the table: an OPD pipeline variant, or the TRL peer baseline."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=ROW_NAME, description="Row name (its runs go to runs/<name>/seed<k>/).")
    kind: Literal["opd", "trl"] = Field("opd", description="opd: the pipeline; trl: TRL's GKDTrainer (reverse KL).")
    label: str = Field("", description="What the row is, for the table (default: its name).")
    schedule: str | dict[str, Any] | None = Field(None, description="actor.schedule (None: the pipeline's).")
    loss: str | dict[str, Any] | None = Field(None, description="learner.loss (None: the experiment's `loss`).")
    teacher_topk: int | Literal["vocab"] | None = Field(
        None, description="teacher.topk; `vocab`: the whole vocabulary (topk_kl is then the exact KL). None: the "
        "experiment's `teacher_topk`.")
    set: list[str] = Field(default_factory=list, description="More KEY=VALUE overrides of the pipeline config.")
    charge_cache: bool | None = Field(
        None, description="Count the teacher FLOPs of cache hits in the budget (true: every teacher-scored token "
        "costs the same, cached or not: compute-matched) or not (false: a `+ cache` row, what the cache buys). "
        "None: the experiment's `charge_cache`.")
    probe_truth: bool = Field(False, description="Sample every truncated rollout to full length too (actor."
                              "probe_truth): the savings estimate checked against the truth, at extra generation cost.")

    @model_validator(mode="after")
    def _trl_takes_no_pipeline_options(self) -> RowConfig:
        if self.kind == "trl" and (self.schedule is not None or self.loss is not None or self.set
                                   or self.charge_cache is not None or self.probe_truth):
            raise ValueError(f"rows.{self.name}: a trl row has no schedule, loss, set, charge_cache or probe_truth "
                             "(it always trains on full rollouts with the exact reverse KL, without a cache)")
        return self


class BootstrapSettings(BaseModel):
    """The intervals of the table (opd/experiment/stats.py): a percentile bootstrap over seeds and problems."""

    model_config = ConfigDict(extra="forbid")

    resamples: int = Field(2000, ge=100, description="Bootstrap replicates.")
    seed: int = Field(0, description="Seed of the replicates' draws (the same table every time).")
    level: float = Field(0.95, gt=0, lt=1, description="Coverage of the intervals.")


class EvalSettings(BaseModel):
    """Held-out evaluation of every checkpoint (outside the compute budget)."""

    model_config = ConfigDict(extra="forbid")

    kl_prompts: int = Field(64, ge=1, description="Held-out prompts for the full-length reverse KL to the teacher.")
    accuracy_prompts: int = Field(200, ge=0, description="Held-out problems for greedy exact match (0: skip).")
    checker: Literal["task", "none"] = Field("task", description="task: the binary task's checker; none: KL only "
                                             "(your own models and prompts).")
    max_new_tokens: int | None = Field(None, ge=1, description="Generation budget (None: actor.max_new_tokens).")
    batch_size: int = Field(32, ge=1, description="Prompts per evaluation batch.")
    seed: int = Field(1234, description="Seed of the KL's samples (the same for every checkpoint: paired).")
    device: str = Field("auto", description="Device of the KL evaluation: auto | cpu | cuda | cuda:N (the task's "
                        "greedy exact match runs on the CPU).")


class TRLSettings(BaseModel):
    """The peer baseline's own options; everything else (models, prompts, lr, batch, budget) is the pipeline's."""

    model_config = ConfigDict(extra="forbid")

    lmbda: float = Field(1.0, ge=0, le=1, description="GKD's on-policy fraction (1: always student samples).")
    beta: float = Field(1.0, ge=0, le=1, description="GKD's JSD interpolation (1: reverse KL, what OPD minimises).")
    threads: int = Field(1, ge=1, description="torch threads of the TRL process.")
    device: str = Field("auto", description="auto (cuda when torch sees one) | cpu | cuda.")
    timeout_s: float = Field(3600.0, gt=0, description="Give up on the TRL run after this long.")


class PresetSettings(BaseModel):
    """What `--preset <name>` runs instead: a subset of rows, fewer seeds, another budget and evaluation."""

    model_config = ConfigDict(extra="forbid")

    rows: list[str] | None = Field(None, description="The rows to run, in this order (None: every row).")
    seeds: list[int] | None = None
    budget_flops: float | None = Field(None, gt=0)
    checkpoints: int | None = Field(None, ge=1)
    eval: dict[str, Any] = Field(default_factory=dict, description="Overrides of `eval`.")
    set: list[str] = Field(default_factory=list, description="More pipeline overrides for every OPD row.")


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("truncation", pattern=ROW_NAME)
    out_dir: UserPath = Field("runs/experiment", description="Results go to <out_dir>/<name>[-<preset>]/.")
    models_dir: UserPath = Field("models/task", description="teacher/, student/, prompts.jsonl, heldout.jsonl "
                                 "(what `opd experiment train-teacher` / `train-student` write).")
    student_dir: UserPath | None = Field(None, description="Student model dir (None: <models_dir>/student).")
    teacher_dir: UserPath | None = Field(None, description="Teacher model dir (None: <models_dir>/teacher).")
    prompts_file: UserPath | None = Field(None, description="Training prompts (None: <models_dir>/prompts.jsonl).")
    heldout_file: UserPath | None = Field(None, description="Held-out prompts (None: <models_dir>/heldout.jsonl).")
    pipeline: dict[str, Any] = Field(default_factory=dict, description="The `opd up` config tree every OPD row "
                                     "starts from.")
    loss: str | dict[str, Any] | None = Field(None, description="learner.loss of rows that name none.")
    teacher_topk: int | Literal["vocab"] | None = Field(None, description="teacher.topk of rows that name none.")
    budget_flops: float = Field(..., gt=0, description="Compute budget of every run (protocol/compute.py).")
    checkpoints: int = Field(10, ge=1, description="Evaluate at budget x i / checkpoints, i = 1..checkpoints "
                             "(the resolution of `compute to reach`: one mark).")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1,
                             description="One run per seed and row (5 or more for a reported row: fewer give "
                             "bootstrap intervals too narrow to trust).")
    charge_cache: bool = Field(True, description="Count the teacher FLOPs of cache hits in every OPD row's budget "
                               "(compute-matched: a full cache hit is otherwise free, so rows whose rollouts repeat "
                               "get teacher compute for nothing). A row's `charge_cache: false` is a `+ cache` row.")
    bootstrap: BootstrapSettings = Field(default_factory=BootstrapSettings)
    reference_row: str = Field("full", description="The row whose final accuracy the others must reach.")
    threads: int = Field(1, ge=1, description="torch threads of the evaluation (the runner's process).")
    keep_weights: bool = Field(True, description="Keep each run's checkpoint weights after evaluating them (false "
                               "for big models: checkpoints x runs copies of the student).")
    keep_pipeline_state: bool = Field(False, description="Keep a finished run's pipeline state (published weights, "
                                      "the learner's resume checkpoints, the teacher cache, Redis's file): gigabytes "
                                      "a run on a real model, never read again by the experiment. Failed runs keep "
                                      "theirs.")
    eval: EvalSettings = Field(default_factory=EvalSettings)
    trl: TRLSettings = Field(default_factory=TRLSettings)
    rows: list[RowConfig] = Field(..., min_length=1)
    quick: PresetSettings | None = Field(None, description="The preset `--quick` runs (= presets.quick).")
    presets: dict[str, PresetSettings] = Field(default_factory=dict, description="Named subsets: `--preset <name>`.")

    @model_validator(mode="after")
    def _rows_unique(self) -> ExperimentConfig:
        names = [r.name for r in self.rows]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rows: duplicate names {dup}")
        if self.quick is not None and "quick" in self.presets:
            raise ValueError("quick: given twice (as `quick` and as `presets.quick`)")
        for key, preset in self.all_presets().items():
            unknown = sorted(set(preset.rows or []) - set(names))
            if unknown:
                where = "quick" if key == "quick" and self.quick is not None else f"presets.{key}"
                raise ValueError(f"{where}.rows: {unknown} are not rows (rows: {names})")
        return self

    def charges_cache(self, row: RowConfig) -> bool:
        """Whether `row`'s budget counts the teacher FLOPs its cache hits saved."""
        return self.charge_cache if row.charge_cache is None else row.charge_cache

    def all_presets(self) -> dict[str, PresetSettings]:
        """Every named preset, `quick` included."""
        return {**self.presets, **({"quick": self.quick} if self.quick is not None else {})}

    def path(self, name: Literal["student_dir", "teacher_dir", "prompts_file", "heldout_file"]) -> Path:
        """A model or data path: the explicit key, else its place under `models_dir`."""
        given = getattr(self, name)
        if given is not None:
            return Path(given)
        default = {"student_dir": "student", "teacher_dir": "teacher", "prompts_file": "prompts.jsonl",
                   "heldout_file": "heldout.jsonl"}[name]
        return Path(self.models_dir) / default

    def for_preset(self, name: str) -> ExperimentConfig:
        """The `--preset <name>` variant: that preset applied, named `<name of the experiment>-<preset>`."""
        presets = self.all_presets()
        if name not in presets:
            flag = "--quick: the config has no `quick` section" if name == "quick" else f"--preset {name}: no such preset"
            raise ValueError(f"{flag} (presets: {sorted(presets) or 'none'})")
        q = presets[name]
        by_name = {r.name: r for r in self.rows}
        rows = self.rows if q.rows is None else [by_name[n] for n in q.rows]  # the preset's order: runs go in it
        data = self.model_dump(mode="python")
        data.update(name=f"{self.name}-{name}", rows=[r.model_dump() for r in rows], quick=None, presets={},
                    seeds=q.seeds or self.seeds, budget_flops=q.budget_flops or self.budget_flops,
                    checkpoints=q.checkpoints or self.checkpoints,
                    eval={**self.eval.model_dump(), **q.eval})
        if q.set:
            data["rows"] = [{**r, "set": [*q.set, *r["set"]]} if r["kind"] == "opd" else r for r in data["rows"]]
        return ExperimentConfig.model_validate(data)


def load_experiment(path: str | Path, *, quick: bool = False, preset: str | None = None) -> ExperimentConfig:
    """The experiment config in `path` (a preset's variant if asked, `quick` = preset "quick"); ValueError naming
    the key on a mistake."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"experiment config {p} does not exist")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"experiment config {p} is not valid YAML: {exc}") from None
    try:
        cfg = ExperimentConfig.model_validate(tree)
        preset = "quick" if quick else preset
        return cfg.for_preset(preset) if preset else cfg
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ValueError(f"invalid experiment config {p}:\n" + "\n".join(lines)) from None
