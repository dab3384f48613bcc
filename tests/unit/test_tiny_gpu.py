"""The GPU test models (opd/tiny_gpu.py) are what an SGLang server on Hopper can serve (issue 18, item 7).

Why: SGLang's FlashAttention 3 backend takes head sizes 64/128/256 only and serves fp32 checkpoints
in fp16; the CPU models (head sizes 16 and 40, fp32, 74 ids) could not be loaded as meant, and the
live SGLang tests send ids up to 700. Built here on the CPU, no GPU needed.

Pins:
- both models: head size 64 (hidden = heads * 64), BF16 tensors on disk and `dtype: bfloat16` in
  config.json, a vocabulary of at least 1024 that equals the tokenizer's;
- the tokenizer is real and covers every id: each id decodes to text that encodes back to that id,
  and the CPU task's text encodes to the CPU tokenizer's ids;
- transformers loads each directory (bf16 by default) and scores ids up to the top of the vocabulary;
- the layout is opd/tiny.py's (student/, teacher/, prompts.jsonl, heldout.jsonl), built once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.tiny import asset_paths, build_tokenizer
from opd.tiny_gpu import VOCAB_SIZE, build_gpu_assets, build_gpu_tokenizer, gpu_model_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-gpu")
    build_gpu_assets(root, seed=0, teacher_steps=2, n_train_prompts=16, n_heldout_prompts=4)
    return root


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_models_have_head_size_64_bf16_and_a_large_vocabulary(assets: Path, role: str) -> None:
    directory = getattr(asset_paths(assets), f"{role}_dir")
    config = json.loads((directory / "config.json").read_text())
    assert config["head_dim"] == 64 and config["hidden_size"] == 64 * config["num_attention_heads"], config
    assert config["dtype"] == "bfloat16" and config["vocab_size"] >= 1024, config
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert dtypes == {"BF16"}, dtypes
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == config["vocab_size"] == VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_transformers_loads_them_and_scores_every_id(assets: Path, role: str) -> None:
    directory = getattr(asset_paths(assets), f"{role}_dir")
    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True).eval()
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[1, 100, 200, 300, 400, 500, 600, 700, VOCAB_SIZE - 1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_SIZE) and torch.isfinite(logits).all()


def test_the_tokenizer_covers_every_id() -> None:
    tokenizer = build_gpu_tokenizer()
    for i in range(4, VOCAB_SIZE):  # specials (0-3) are skipped by design when decoding text
        text = tokenizer.decode([i])
        assert tokenizer.encode(text, add_special_tokens=False) == [i], (i, text)
    task = "up 3 5: 7 9"
    assert tokenizer.encode(task) == build_tokenizer().encode(task)


def test_layout_is_the_cpu_models_and_is_built_once(assets: Path) -> None:
    paths = asset_paths(assets)
    assert paths.student_dir.is_dir() and paths.teacher_dir.is_dir()
    assert len(paths.prompts_file.read_text().splitlines()) == 16 and len(paths.heldout_file.read_text().splitlines()) == 4
    marker = (paths.student_dir / "model.safetensors").stat().st_mtime_ns
    build_gpu_assets(assets, teacher_steps=5)
    assert (paths.student_dir / "model.safetensors").stat().st_mtime_ns == marker


def test_bad_arguments_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="teacher_steps"):
        build_gpu_assets(tmp_path, teacher_steps=-1)
    with pytest.raises(ValueError, match="student_warmup_steps"):
        build_gpu_assets(tmp_path, student_warmup_steps=-1)
    with pytest.raises(ValueError, match="role"):
        gpu_model_config("critic")
