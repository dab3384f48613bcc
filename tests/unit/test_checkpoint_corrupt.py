"""A damaged checkpoint at resume (issue 11, bad input): one clear error naming the file, never unpickling.

Pinned, on real checkpoints of a tiny Llama written by `save_checkpoint` and then damaged on disk:
- a truncated safetensors file (model, optimizer, RNG), garbage JSON (meta, optimizer, scheduler), a
  missing weights or meta file: `resume.restore` raises `CheckpointCorrupt` whose message names the
  damaged file and the previous checkpoint (no automatic fallback: learner/resume.py says why);
- with no older checkpoint the message says so;
- nothing is unpickled while trying (`torch.load` and `pickle.loads` fail the test if called);
- an optimizer state that does not fit the optimizer names optimizer.json (`Restored.apply`);
- an undamaged newest checkpoint still loads;
- a model directory with a damaged safetensors file (truncated, garbage, empty) is refused by
  `check_model_dir`, naming the config key and the file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import transformers

from learner import resume
from learner.checkpoint import CheckpointCorrupt, WriteFailed, latest_checkpoint, save_checkpoint
from protocol.files import DISK_FULL, IO_ERROR, write_error_reason

transformers.logging.set_verbosity_error()


def _model(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))


def _checkpoints(root: Path, steps: tuple[int, ...] = (1, 2)) -> list[Path]:
    """Real checkpoints (model, AdamW state after one step, scheduler, RNG) at `steps`."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return [save_checkpoint(root, model, optimizer, scheduler, step=s, policy_version=s, keep_last=5) for s in steps]


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated model weights": ("model/model.safetensors", _truncate),
    "truncated optimizer tensors": ("optimizer.safetensors", _truncate),
    "truncated rng tensors": ("rng.safetensors", _truncate),
    "garbage meta.json": ("meta.json", lambda p: p.write_text("{not json")),
    "garbage optimizer.json": ("optimizer.json", lambda p: p.write_bytes(b"\x00\xff garbage")),
    "meta.json without its fields": ("meta.json", lambda p: p.write_text(json.dumps({"format_version": 1}))),
    "missing model weights": ("model/model.safetensors", lambda p: p.unlink()),
    "missing meta.json": ("meta.json", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_with_the_previous_one(tmp_path: Path, case: str) -> None:
    older, newest = _checkpoints(tmp_path)
    name, damage = DAMAGE[case]
    damage(newest / name)
    with pytest.raises(CheckpointCorrupt) as info:
        resume.restore(_model(1), tmp_path)
    msg = str(info.value)
    assert str(newest / name) in msg, msg
    assert f"previous checkpoint is {older}" in msg and f"move {newest} aside" in msg, msg
    assert "\n" not in msg  # one line, not a traceback


def test_the_only_checkpoint_damaged_says_there_is_no_older_one(tmp_path: Path) -> None:
    (only,) = _checkpoints(tmp_path, (3,))
    _truncate(only / "model" / "model.safetensors")
    with pytest.raises(CheckpointCorrupt, match="there is no older checkpoint"):
        resume.restore(_model(), tmp_path)


def test_moving_the_damaged_one_aside_resumes_from_the_previous(tmp_path: Path) -> None:
    older, newest = _checkpoints(tmp_path)
    _truncate(newest / "model" / "model.safetensors")
    newest.rename(tmp_path / "damaged-step-000002")
    assert latest_checkpoint(tmp_path) == older
    restored = resume.restore(_model(1), tmp_path)
    assert (restored.path, restored.step, restored.version) == (older, 1, 1)


@pytest.mark.parametrize("name", ["optimizer", "scheduler"])
def test_optimizer_or_scheduler_state_that_does_not_fit_names_its_file(tmp_path: Path, name: str) -> None:
    """Their state is applied once the optimizer exists (`Restored.apply`), so that is where it is refused."""
    (path,) = _checkpoints(tmp_path, (1,))
    if name == "optimizer":  # one parameter id for a group of many parameters
        tree = json.loads((path / "optimizer.json").read_text())
        tree["param_groups"][0]["params"] = [0]
        (path / "optimizer.json").write_text(json.dumps(tree))
    else:
        (path / "scheduler.json").write_text("[1, 2, 3]")
    model = _model(1)
    restored = resume.restore(model, tmp_path)
    from learner.distributed import Distributed, TrainModel

    train_model = TrainModel(model, Distributed(), fsdp=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(CheckpointCorrupt, match=rf"{path / name}\.json: does not fit"):
        restored.apply(train_model, optimizer, scheduler)


def test_an_undamaged_checkpoint_loads(tmp_path: Path) -> None:
    _older, newest = _checkpoints(tmp_path)
    restored = resume.restore(_model(1), tmp_path)
    assert (restored.path, restored.step) == (newest, 2)


def test_write_errors_are_classified() -> None:
    """The label that says "the disk", for errors as roles meet them (safetensors wraps the OS error in text)."""
    assert write_error_reason(OSError(28, "No space left on device")) == DISK_FULL
    assert write_error_reason(OSError(122, "Disk quota exceeded")) == DISK_FULL
    assert write_error_reason(Exception("Error while serializing: I/O error: No space left on device (os error 28)")) \
        == DISK_FULL
    assert write_error_reason(PermissionError(13, "Permission denied")) == IO_ERROR
    assert write_error_reason(ValueError("cannot checkpoint a object")) == "other"
    wrapped = WriteFailed("checkpoint", Path("/x/step-000001"), OSError(28, "No space left on device"), None)
    assert wrapped.reason == DISK_FULL and "/x/step-000001" in str(wrapped) and "no previous one" in str(wrapped)


def _damaged_model_dir(tmp_path: Path, how: str) -> Path:
    d = tmp_path / how
    _model().save_pretrained(d)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated data": data[:-100], "truncated header": data[:200],
                         "garbage": b"\x00" * 64, "empty": b""}[how])
    return d


@pytest.mark.parametrize("how", ["truncated data", "truncated header", "garbage", "empty"])
def test_a_damaged_model_file_is_named_before_transformers_reads_it(tmp_path: Path, how: str) -> None:
    """Model dirs whose files cannot be read (issue 11, bad input): every loader calls `check_model_dir` first
    (HF engine, HF scorer, learner, evaluator, `opd up`), so the error names the key and the file, where
    transformers would end a deep traceback in "SafetensorError: invalid header length"."""
    from protocol.files import check_model_dir

    good = tmp_path / "good"
    _model().save_pretrained(good)
    assert check_model_dir(good, "actor.model_dir") == good
    bad = _damaged_model_dir(tmp_path, how)
    with pytest.raises(ValueError, match=rf"teacher\.model_dir: {bad / 'model.safetensors'} (is truncated|is not a readable)"):
        check_model_dir(bad, "teacher.model_dir")
