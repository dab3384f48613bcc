"""Tests for learner/checkpoint.py (and learner/publish.py, learner/statetree.py, learner/modeldirs.py).

Behaviours pinned:
- save -> mutate -> load restores identical parameters, AdamW state (exp_avg, exp_avg_sq, step), param
  group hyperparameters, LR scheduler state and meta (step, policy_version, extra), and training then
  continues bit-identically (same losses, same parameters, same python/numpy/torch RNG draws) as an
  uninterrupted run;
- nothing is pickled: only .safetensors / .json files are written, and loading works with torch.load
  disabled; the model dir is a plain HF dir that from_pretrained loads;
- a killed write (leftover .tmp-* dir, or a step dir without the COMPLETE marker) is ignored by
  latest_checkpoint and load_checkpoint refuses an incomplete dir; a save that fails mid-way leaves no
  step dir and the next save removes the leftovers;
- keep_last prunes older checkpoints (never the one just written), re-saving a step replaces it;
- publish_weights writes root/v000123 atomically (tokenizer included when given), returns its size,
  keeps the last N versions, and the result loads with from_pretrained into identical weights;
- load_checkpoint's meta reads as attributes and as meta["step"]; save accepts model/optimizer/scheduler
  positionally;
- bad arguments raise ValueError.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from learner import checkpoint as ckpt
from learner import modeldirs
from learner.checkpoint import (
    COMPLETE_MARKER,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from learner.publish import list_published, publish_weights
from learner.statetree import decode_tree, encode_tree

transformers.logging.set_verbosity_error()


def tiny_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )


def make_training(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> tuple[float, float, float]:
    """One step whose data and dropout-like noise come from all three global RNGs."""
    ids = torch.randint(0, 64, (2, 9))
    noise = random.random() + float(np.random.rand())
    loss = model(input_ids=ids, labels=ids).loss * (1 + 0.01 * noise)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item(), random.random(), float(np.random.rand())


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_roundtrip_restores_everything_and_training_continues_identically(tmp_path, monkeypatch):
    model, optimizer, scheduler = make_training()
    random.seed(1)
    np.random.seed(1)
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    saved_params = params(model)
    saved_opt = optimizer.state_dict()
    saved_opt_tensors = {
        (i, k): v.clone() for i, s in saved_opt["state"].items() for k, v in s.items()
    }
    saved_sched = scheduler.state_dict()
    extra = {"stream": {"opd:scored": "1700000000000-5"}, "ledger": [1, 2, 3]}
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=3,
                           policy_version=2, extra=extra)
    assert path == tmp_path / "step-000003"
    reference = [train_step(model, optimizer, scheduler) for _ in range(2)]
    reference_params = params(model)

    # Mutate everything a resume must restore.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    for group in optimizer.param_groups:
        group["lr"] = 123.0
    train_step(model, optimizer, scheduler)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used")

    monkeypatch.setattr(torch, "load", no_torch_load)
    meta = load_checkpoint(path, model, optimizer, scheduler)
    assert (meta.step, meta.policy_version, meta.extra) == (3, 2, extra)
    assert (meta["step"], meta["policy_version"], meta["extra"]) == (3, 2, extra)
    with pytest.raises(KeyError):
        meta["nope"]
    for name, tensor in params(model).items():
        assert torch.equal(tensor, saved_params[name]), name
    restored = optimizer.state_dict()
    for (i, k), tensor in saved_opt_tensors.items():
        assert torch.equal(restored["state"][i][k], tensor), (i, k)
    assert restored["param_groups"] == saved_opt["param_groups"]
    assert isinstance(optimizer.param_groups[0]["betas"], tuple)
    assert scheduler.state_dict() == saved_sched

    resumed = [train_step(model, optimizer, scheduler) for _ in range(2)]
    assert resumed == reference  # same losses and same RNG draws, bit for bit
    for name, tensor in params(model).items():
        assert torch.equal(tensor, reference_params[name]), name


def test_only_safetensors_and_json_and_model_dir_is_hf_loadable(tmp_path):
    model, optimizer, scheduler = make_training()
    train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=1,
                           policy_version=1)
    files = [p for p in path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files if p.name != COMPLETE_MARKER} <= {".safetensors", ".json"}
    assert (path / "optimizer.safetensors").is_file() and (path / "rng.safetensors").is_file()
    loaded = transformers.LlamaForCausalLM.from_pretrained(path / ckpt.MODEL_DIR)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_killed_writes_are_ignored_and_cleaned_up(tmp_path, monkeypatch):
    model, optimizer, scheduler = make_training()
    good = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=5,
                           policy_version=5)
    # A writer killed mid-way leaves a temp dir; a copied-in dir may lack the marker.
    leftover = tmp_path / ".tmp-step-000009-abcd"
    (leftover / "model").mkdir(parents=True)
    (leftover / "meta.json").write_text("{}")
    incomplete = tmp_path / "step-000010"
    incomplete.mkdir()
    (incomplete / "meta.json").write_text(json.dumps({"step": 10}))
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(incomplete, model)

    # A save that dies before its rename leaves no step dir behind.
    def boom(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(modeldirs.os, "replace", boom)
    with pytest.raises(OSError, match="disk vanished"):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=6, policy_version=6)
    monkeypatch.undo()
    assert not (tmp_path / "step-000006").exists()
    assert latest_checkpoint(tmp_path) == good

    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=7, policy_version=7)
    assert not leftover.exists()
    assert incomplete.exists()  # not ours to delete
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000007"


def test_keep_last_and_resave(tmp_path):
    model, optimizer, _ = make_training()
    for step in (1, 2, 3, 4):  # model / optimizer / scheduler may be passed positionally
        save_checkpoint(tmp_path, model, optimizer, None, step=step, policy_version=step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    # Resuming from an older checkpoint then saving a lower step never deletes the new one.
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=2, policy_version=2, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003", "step-000004"]
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, step=4, policy_version=9,
                           extra={"x": 1}, keep_last=3)
    assert read_meta(path).policy_version == 9 and read_meta(path).extra == {"x": 1}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_load_refuses_missing_parts(tmp_path):
    model, optimizer, scheduler = make_training()
    path = save_checkpoint(tmp_path, model=model, optimizer=None, step=1, policy_version=0)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, model, optimizer)
    with pytest.raises(ValueError, match="no scheduler state"):
        load_checkpoint(path, model, None, scheduler)
    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**tiny_config().to_dict(), "num_hidden_layers": 3})
    )
    with pytest.raises(ValueError, match="lacks weights"):
        load_checkpoint(path, other)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": -1, "policy_version": 0}, "step"),
        ({"step": 1, "policy_version": -3}, "policy_version"),
        ({"step": 1, "policy_version": 0, "keep_last": 0}, "keep_last"),
        ({"step": 1, "policy_version": 0, "extra": {"bad": object()}}, "JSON"),
        ({"step": 1, "policy_version": 0, "extra": {"nan": float("nan")}}, "JSON"),
    ],
)
def test_save_rejects_bad_arguments(tmp_path, kwargs, match):
    model, optimizer, _ = make_training()
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, **kwargs)
    assert latest_checkpoint(tmp_path) is None


def test_publish_weights(tmp_path):
    model, _, _ = make_training()
    root = tmp_path / "weights"
    paths = []
    for version in (1, 2, 3):
        path, nbytes = publish_weights(model, root, version, keep_last=2)
        paths.append(path)
        assert path == root / f"v{version:06d}"
        assert nbytes == sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) > 0
    assert list_published(root) == paths[1:]
    assert not any(p.name.startswith(".") for p in root.iterdir())
    loaded = transformers.LlamaForCausalLM.from_pretrained(paths[-1])
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    # Re-publishing a version (after a restart) replaces it with the new weights.
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    publish_weights(model, root, 3, keep_last=2)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(paths[-1])
    first = next(iter(model.state_dict()))
    assert torch.equal(reloaded.state_dict()[first], model.state_dict()[first])
    with pytest.raises(ValueError, match="keep_last"):
        publish_weights(model, root, 4, keep_last=0)
    with pytest.raises(ValueError, match="version"):
        publish_weights(model, root, -1, keep_last=1)


def test_publish_weights_ships_the_tokenizer_inside_the_atomic_dir(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]")), unk_token="[UNK]"
    )
    model, _, _ = make_training()
    path, nbytes = publish_weights(model, tmp_path, 7, keep_last=2, tokenizer=tokenizer)
    assert nbytes == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    loaded = transformers.AutoTokenizer.from_pretrained(path)
    assert loaded.convert_tokens_to_ids(["a", "b"]) == [1, 2]


def test_state_tree_encoding_roundtrip():
    tensors: dict[str, torch.Tensor] = {}
    obj = {
        "state": {0: {"step": torch.tensor(3.0), "buf": torch.arange(4)}, 1: {}},
        "groups": [{"betas": (0.9, 0.95), "lr": 1e-3, "params": [0, 1], "flag": None, "inf": float("inf")}],
        "np": np.arange(3, dtype=np.uint32),
        "__tensor__": "not a tag",
    }
    tree = encode_tree(obj, "", tensors, set())
    json.dumps(tree, allow_nan=False)
    back = decode_tree(json.loads(json.dumps(tree)), tensors)
    assert back["state"][0]["step"].item() == 3.0 and torch.equal(back["state"][0]["buf"], torch.arange(4))
    assert back["state"][1] == {}
    assert back["groups"][0]["betas"] == (0.9, 0.95) and back["groups"][0]["inf"] == float("inf")
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2]
    assert back["__tensor__"] == "not a tag"
    with pytest.raises(ValueError, match="cannot checkpoint a object"):
        encode_tree({"x": object()}, "", {}, set())


def test_latest_checkpoint_on_missing_root(tmp_path: Path):
    assert latest_checkpoint(tmp_path / "nope") is None
    assert list_published(tmp_path / "nope") == []
