"""A finished experiment run drops its pipeline's state and keeps its records (opd/experiment/runner.py)."""

from __future__ import annotations

from pathlib import Path

from opd.experiment.runner import PIPELINE_STATE, _drop_pipeline_state


def test_the_state_goes_and_the_records_stay(tmp_path: Path) -> None:
    work = tmp_path / "pipeline"
    for rel in PIPELINE_STATE:
        (work / rel / "v000001").mkdir(parents=True)
        (work / rel / "v000001" / "model.safetensors").write_bytes(b"\0" * 1000)
    kept = [work / "learner" / "history.jsonl", work / "logs" / "learner-0.log", work / "launcher.log"]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n")
    _drop_pipeline_state(work)
    assert [rel for rel in PIPELINE_STATE if (work / rel).exists()] == []
    assert all(path.read_text() == "{}\n" for path in kept)
    _drop_pipeline_state(work)  # again, with nothing left to drop: no error
