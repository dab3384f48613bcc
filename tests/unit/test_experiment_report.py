"""The experiment's configuration and report, on synthetic run records (no pipeline runs here).

Pins: `--quick` selects its rows, seeds, budget and evaluation; a bad row is named; mean +- std over seeds per
compute mark; "to reach the reference's final accuracy" takes each seed's first checkpoint at or above it and
compares compute with the reference row; skipped and failed runs are listed with their reasons; the TRL
baseline's batches hold one prompt length.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from opd.experiment.config import ExperimentConfig, load_experiment
from opd.experiment.report import aggregate, markdown
from opd.experiment.trl_baseline import _batches_by_length

BASE = {"budget_flops": 100.0, "checkpoints": 2, "seeds": [0, 1],
        "rows": [{"name": "full", "schedule": "full"}, {"name": "short", "schedule": {"kind": "fixed", "fraction": 0.1}},
                 {"name": "trl", "kind": "trl"}],
        "quick": {"rows": ["full", "trl"], "seeds": [0], "budget_flops": 10.0, "eval": {"kl_prompts": 3}}}


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_quick_variant(tmp_path: Path) -> None:
    cfg = load_experiment(_write(tmp_path, BASE), quick=True)
    assert cfg.name == "truncation-quick" and [r.name for r in cfg.rows] == ["full", "trl"]
    assert cfg.seeds == [0] and cfg.budget_flops == 10.0 and cfg.eval.kl_prompts == 3
    assert cfg.eval.accuracy_prompts == 200  # not overridden: the full config's


def test_named_preset(tmp_path: Path) -> None:
    cfg = load_experiment(_write(tmp_path, {**BASE, "presets": {"cut": {"rows": ["short"], "budget_flops": 5.0}}}),
                          preset="cut")
    assert cfg.name == "truncation-cut" and [r.name for r in cfg.rows] == ["short"] and cfg.budget_flops == 5.0
    assert cfg.seeds == [0, 1] and cfg.presets == {} and cfg.quick is None
    with pytest.raises(ValueError, match=r"--preset nope: no such preset \(presets: \['cut', 'quick'\]\)"):
        load_experiment(_write(tmp_path, {**BASE, "presets": {"cut": {}}}), preset="nope")


@pytest.mark.parametrize("change, named", [
    ({"rows": [{"name": "a"}, {"name": "a"}]}, "duplicate names"),
    ({"quick": {"rows": ["nope"]}}, "quick.rows"),
    ({"presets": {"loss": {"rows": ["full", "nope"]}}}, "presets.loss.rows"),
    ({"presets": {"quick": {"rows": ["full"]}}}, "given twice"),
    ({"rows": [{"name": "t", "kind": "trl", "schedule": "full"}]}, "rows.t"),
    ({"budget_flops": -1}, "budget_flops"),
])
def test_mistakes_are_named(tmp_path: Path, change: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        load_experiment(_write(tmp_path, {**BASE, **change}))


def _run(row: str, seed: int, accs: list[float], kls: list[float], flops: list[float]) -> dict:
    checkpoints = [{"index": i, "mark_flops": 50.0 * i, "flops": {"total": f}, "wall_s": f / 10, "step": i,
                    "eval": {"accuracy": a, "reverse_kl": k, "finished": 1.0}}
                   for i, (a, k, f) in enumerate(zip(accs, kls, flops, strict=True))]
    return {"row": row, "seed": seed, "status": "ok", "reason": None, "steps": 10, "wall_s": 12.0,
            "stats": {"actor_tokens_generated": 100.0}, "checkpoints": checkpoints}


def test_aggregate_and_table() -> None:
    cfg = ExperimentConfig.model_validate(BASE)
    records = [
        _run("full", 0, [0.1, 0.3, 0.5], [1.0, 0.5, 0.3], [0, 52, 101]),
        _run("full", 1, [0.1, 0.5, 0.7], [1.0, 0.7, 0.5], [0, 51, 103]),
        _run("short", 0, [0.1, 0.6, 0.4], [1.0, 0.4, 0.4], [0, 50, 100]),
        _run("short", 1, [0.1, 0.2, 0.6], [1.0, 0.6, 0.4], [0, 54, 100]),
        {"row": "trl", "seed": 0, "status": "skipped", "reason": "trl is not installed", "checkpoints": []},
        {"row": "trl", "seed": 1, "status": "failed", "reason": "RuntimeError: boom\nmore", "checkpoints": []},
    ]
    summary = aggregate(cfg, records, preset=None, command="opd experiment run --config x")
    full, short, trl = summary["rows"]
    assert full["checkpoints"][1]["accuracy"] == pytest.approx(0.4)
    assert full["checkpoints"][1]["accuracy_std"] == pytest.approx(0.1414, abs=1e-3)
    assert full["checkpoints"][2]["kl"] == pytest.approx(0.4) and full["checkpoints"][2]["flops"] == pytest.approx(102)
    assert summary["target_accuracy"] == pytest.approx(0.6)
    # full: seed 0 never reaches 0.6 (censored at one mark past the budget: 150), seed 1 at its last mark (103);
    # short: seed 0 at mark 1 (50), seed 1 at mark 2 (100). Restricted means 126.5 and 75.
    assert summary["cap_flops"] == pytest.approx(150)
    assert (full["reach"]["reached"], full["reach"]["restricted_mean"]["point"]) == (1, pytest.approx(126.5))
    assert (short["reach"]["reached"], short["reach"]["restricted_mean"]["point"]) == (2, pytest.approx(75))
    assert short["reach"]["ratio"]["point"] == pytest.approx(126.5 / 75)
    assert short["reach"]["ratio"]["low"] < 1 < short["reach"]["ratio"]["high"]  # two seeds: not separated
    assert short["reach"]["verdict"] == "not separated" and full["reach"]["verdict"] == "reference"
    assert trl["seeds"] == [] and trl["skipped"] == "trl is not installed" and trl["failed"] == {1: "RuntimeError: boom\nmore"}
    text = markdown(summary)
    assert "| full | 10.0 | 40.0 [30.0, 50.0] | 60.0 [50.0, 70.0] |" in text
    assert "| short | 75 FLOP [50 FLOP, 150 FLOP] | 1.69x [0.69, 2.53] | not separated | 2/2 |" in text
    assert "Verdict: no row separated from the reference." in text
    assert ": beats the reference" not in text
    assert "**2 seeds per row**" in text and "provisional" in text
    full["seeds"] = [*full["seeds"], 2]  # rows of unequal seed counts: the span, not the fewest as if for all
    assert "**2 to 3 seeds per row**" in markdown(summary)
    full["seeds"] = full["seeds"][:2]
    assert "`trl` skipped: trl is not installed" in text and "`trl` seed 1 failed: RuntimeError: boom" in text


def test_verdict_names_a_row_only_when_its_interval_excludes_one() -> None:
    """Five seeds each; `short` reaches the reference's final accuracy at the first mark on every seed, `full` at
    its last: the ratio's interval is above 1 and the table says `beats`, and nothing stronger."""
    cfg = ExperimentConfig.model_validate({**BASE, "seeds": [0, 1, 2, 3, 4]})
    records = [_run("full", k, [0.1, 0.3, 0.6 + 0.01 * k], [1.0, 0.5, 0.3], [0, 50, 100]) for k in range(5)]
    records += [_run("short", k, [0.1, 0.7, 0.7], [1.0, 0.3, 0.3], [0, 50, 100]) for k in range(5)]
    summary = aggregate(cfg, records, preset=None, command="c")
    short = summary["rows"][1]["reach"]
    assert short["ratio"]["low"] > 1 and short["verdict"] == "beats"
    text = markdown(summary)
    assert "Verdict: short: beats the reference." in text and "provisional" not in text


def test_trl_batches_hold_one_prompt_length() -> None:
    prompts = [[1] * n for n in (3, 3, 3, 3, 5, 5, 5, 7)]
    ordered = _batches_by_length(prompts, 2, seed=0, count=12)
    assert len(ordered) == 12
    for i in range(0, 12, 2):
        assert len(ordered[i]) == len(ordered[i + 1])
    with pytest.raises(ValueError, match="batch_size"):
        _batches_by_length([[1], [1, 2]], 2, seed=0, count=2)


def test_stored_schedules_result_does_not_separate_random_from_full(tmp_path: Path) -> None:
    """`opd experiment report` on the shipped 2-seed schedules result: the random horizon's 1.11x of the old table
    does not exclude 1 (what README.md and docs/experiments.md now say), those runs' cache hits were free, and
    the records hold no per-problem results (said in the table)."""
    from opd.cli import main

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "table.md"
    assert main(["experiment", "report", str(repo / "docs/results/truncation-schedules/results.json"),
                 "--resamples", "500", "--out", str(out)]) == 0
    text = out.read_text()
    random_row = next(line for line in text.splitlines() if line.startswith("| random 5%-100% | 1.44 TFLOP"))
    assert "| not separated |" in random_row and "(free)" in random_row
    assert "over seeds only" in text and "Verdict: TOPD rho=0.25: behind the reference." in text
    assert main(["experiment", "report", str(tmp_path / "nope.json")]) == 2


def test_probe_check_section_compares_the_estimate_with_the_truth() -> None:
    """A `probe_truth` run's stats (actor.probe_truth) give the estimate, its stated standard error, the truth and z;
    other runs add no section."""
    cfg = ExperimentConfig.model_validate({**BASE, "rows": [{"name": "full", "schedule": "full"},
                                                            {"name": "short", "probe_truth": True}], "quick": None})
    probe = _run("short", 0, [0.1, 0.3, 0.5], [1.0, 0.5, 0.3], [0, 50, 100])
    # 4 probes saved 10, 20, 30, 40 tokens (mean 25, sd 12.9); 100 other truncated rollouts truly saved 2,600
    probe["stats"] = {"actor_probes": 4.0, "probe_saving_sum": 100.0, "probe_saving_sq_sum": 3000.0,
                      "actor_truncated": 100.0, "truth_saving_sum": 2600.0, "actor_tokens_generated": 1000.0}
    records = [_run("full", 0, [0.1, 0.3, 0.5], [1.0, 0.5, 0.3], [0, 50, 100]), probe]
    summary = aggregate(cfg, records, preset=None, command="c")
    [check] = summary["rows"][1]["probe_truth"]
    assert (check["estimate"], check["truth"], check["probes"], check["rollouts"]) == (2500.0, 2600.0, 4, 100)
    assert check["stderr"] == pytest.approx(12.910 * (100**2 / 4 + 100) ** 0.5, rel=1e-3)
    assert check["z"] == pytest.approx(-100 / check["stderr"])
    text = markdown(summary)
    assert "## Truncation savings: the probe estimate against the truth" in text
    assert "| short | 0 | 4 | 100 | 2500 |" in text and "| 2600 | -100 |" in text
    assert summary["rows"][0]["probe_truth"] == []


def test_plan_runs_every_row_of_a_seed_before_the_next_seed(tmp_path: Path) -> None:
    """An experiment stopped part way holds the same seeds for every row (plan's docstring)."""
    from opd.experiment.runner import plan

    cfg = load_experiment(_write(tmp_path, BASE))
    order = [(spec.seed, spec.row.name) for spec in plan(cfg, tmp_path / "out")]
    assert order == [(0, "full"), (0, "short"), (0, "trl"), (1, "full"), (1, "short"), (1, "trl")]
    assert plan(cfg, tmp_path / "out")[4].dir == tmp_path / "out" / "runs" / "short" / "seed1"


def test_a_preset_runs_its_rows_in_its_own_order(tmp_path: Path) -> None:
    from opd.experiment.runner import plan

    cfg = load_experiment(_write(tmp_path, {**BASE, "presets": {"p": {"rows": ["trl", "full"], "seeds": [3]}}}), preset="p")
    assert [(spec.seed, spec.row.name) for spec in plan(cfg, tmp_path / "out")] == [(3, "trl"), (3, "full")]


def test_stored_real_pair_and_probe_results_say_what_the_readme_says(tmp_path: Path) -> None:
    """The README's claims from the stored runs, recomputed by `opd experiment report`: on the real pair (3 seeds)
    no row is separated from full OPD by the compute ratio (full OPD's final KL is its start, so the target is
    reached at the first mark in some resamples), while TOPD 0.1 and POPD end every compute mark with a held-out
    KL interval wholly below full OPD's; on the binary task at 5 seeds the random horizon beats full OPD and POPD
    is not separated; the probe estimate is within its stated error (|z| < 1) and under the truth in all three."""
    from opd.cli import main

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "pair.md"
    assert main(["experiment", "report", str(repo / "docs/results/smollm2/results.json"), "--resamples", "500",
                 "--out", str(out)]) == 0
    text = out.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "x [" in line}
    assert len(rows) == 5 and all("| not separated |" in row or "| reference |" in row for row in rows.values())
    assert "**3 seeds per row**" in text  # random's third seed ran in session 6
    kl = {line.split(" | ")[0].lstrip("| "): line.strip("|").split("|")[2:] for line in
          text.split("## Held-out full-length reverse KL")[1].split("## ")[0].splitlines() if line.startswith("| ")
          and "[" in line}

    def interval(cell: str) -> tuple[float, float]:
        low, high = cell.split("[")[1].split("]")[0].split(",")
        return float(low), float(high)

    for name in ("TOPD rho=0.1 (13 tokens)", "POPD 10% -> 100% over 12 versions"):
        assert len(kl[name]) == len(kl["full OPD"]) == 4  # the four marks past the start
        for row_cell, full_cell in zip(kl[name], kl["full OPD"], strict=True):
            assert interval(row_cell)[1] < interval(full_cell)[0], (name, row_cell, full_cell)
    out = tmp_path / "tiny.md"  # the binary task at 5 seeds: the random horizon beats full OPD, POPD does not
    assert main(["experiment", "report", str(repo / "docs/results/schedules-5seeds/results.json"), "--resamples",
                 "500", "--out", str(out)]) == 0
    random_row = next(line for line in out.read_text().splitlines() if line.startswith("| random 5%-100% | 1.1"))
    assert "| beats |" in random_row and "| 5/5 |" in random_row
    assert float(random_row.split("x [")[1].split(",")[0]) > 1.0
    popd_row = next(line for line in out.read_text().splitlines() if line.startswith("| POPD") and "x [" in line)
    assert "| not separated |" in popd_row and "| 3/5 |" in popd_row
    out = tmp_path / "probes.md"
    assert main(["experiment", "report", str(repo / "docs/results/probes/results.json"), "--out", str(out)]) == 0
    checks = [line for line in out.read_text().splitlines() if "(probe truth) | 0 |" in line]
    assert len(checks) == 3
    for line in checks:
        cells = [c.strip() for c in line.strip("|").split("|")]
        error, z = float(cells[-2]), float(cells[-1])
        assert error < 0 and abs(z) < 1, line
