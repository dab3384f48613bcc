"""Tiny student/teacher models that an SGLang server on a GPU can load, built in code.

WHY not opd/tiny.py's models: on Hopper SGLang runs FlashAttention 3, which takes head sizes 64,
128 and 256 only, and it serves fp32 checkpoints in fp16; the CPU models have head sizes 16 and 40,
fp32 weights and a 74-token vocabulary, while tests/integration/test_sglang_live.py sends token ids
up to 700 (issue 18, item 7). These models keep the CPU task and its character ids (so the prompts,
the teacher's training and the learner's evaluation are the same), and differ where a GPU server
cares:

- head size 64 in both models (student 2 heads of 64, teacher 4 heads of 64), bf16 weights (config
  `dtype: bfloat16`, BF16 safetensors);
- a vocabulary of `VOCAB_SIZE` (1024): ids 0-73 are opd/tiny.py's specials and characters, every
  other id is a filler token `<t0074>` ... `<t1023>` that the tokenizer encodes and decodes like any
  other, so every id a server or a test may emit round-trips through the real tokenizer.

The layout under `root` is opd/tiny.py's (`asset_paths`): student/, teacher/, prompts.jsonl and
heldout.jsonl, so `opd up` and the GPU smoke check take them as they take the CPU models.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opd.tiny import (
    ALPHABET,
    BOS_ID,
    COMPLETE_MARKER,
    EOS_ID,
    PACK_WIDTH,
    PAD_ID,
    SPECIAL_TOKENS,
    TinyAssets,
    asset_paths,
    encode_example,
    packed_rows,
    quiet_progress_bars,
    sequence_examples,
    single_thread,
    task_split,
    train_lm,
    write_jsonl,
)
from protocol.files import apply_default_modes

VOCAB_SIZE = 1024
HEAD_DIM = 64
MAX_POSITIONS = 1024
# role -> (hidden size, attention heads, layers, MLP width); hidden = heads * HEAD_DIM.
SHAPES: dict[str, tuple[int, int, int, int]] = {"student": (128, 2, 2, 256), "teacher": (256, 4, 2, 512)}


def filler_token(i: int) -> str:
    """The text of id `i` past the character vocabulary: `<t0074>`; four digits cover VOCAB_SIZE."""
    return f"<t{i:04d}>"


def build_gpu_tokenizer() -> PreTrainedTokenizerFast:
    """opd/tiny.py's character tokenizer, extended with filler tokens up to VOCAB_SIZE ids.

    WHY one WordLevel vocabulary (not added tokens): a single `tokenizer.json` that any loader
    (transformers, SGLang's detokenizer) reads the same way; the pre-tokenizer isolates a filler
    token or else one character, so encoding the CPU task's text gives the CPU tokenizer's ids.
    """
    base = [*SPECIAL_TOKENS, *ALPHABET]
    vocab = {tok: i for i, tok in enumerate(base)}
    vocab.update({filler_token(i): i for i in range(len(base), VOCAB_SIZE)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"<t\d{4}>|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def gpu_model_config(role: str) -> LlamaConfig:
    """The Llama config of `role` ("student" or "teacher"): head size 64, bf16, VOCAB_SIZE ids."""
    if role not in SHAPES:
        raise ValueError(f"role must be one of {sorted(SHAPES)}, got {role!r}")
    hidden, heads, layers, intermediate = SHAPES[role]
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    config.dtype = torch.bfloat16
    return config


def build_gpu_assets(
    root: Path, seed: int = 0, *, teacher_steps: int = 200, student_warmup_steps: int = 0, n_train_prompts: int = 256,
    n_heldout_prompts: int = 32, log: Callable[[str], None] | None = None,
) -> TinyAssets:
    """Build (or reuse, once `root/.complete` exists) the GPU test models and prompts under `root`.

    The teacher trains `teacher_steps` AdamW steps on the CPU task in fp32 on the CPU (deterministic
    in `seed`; a few seconds), the student `student_warmup_steps` (0: its random init, as in
    opd/tiny.py; a few steps make its distribution peaked, so a sampling-temperature mismatch shows in
    the importance ratio), then both are cast to bf16 and saved with the tokenizer. No GPU is needed.
    """
    for name, value in (("teacher_steps", teacher_steps), ("student_warmup_steps", student_warmup_steps)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    emit = log or (lambda _msg: None)
    root = Path(root)
    paths = asset_paths(root)
    if (root / COMPLETE_MARKER).exists():
        return paths
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_gpu_tokenizer()
    train, heldout = task_split(seed, n_train_prompts, n_heldout_prompts)
    write_jsonl(paths.prompts_file, train)
    write_jsonl(paths.heldout_file, heldout)
    held = {ex.prompt for ex in heldout}
    pool = [encode_example(tokenizer, ex) for ex in sequence_examples() if ex.prompt not in held]
    data_rng = random.Random(seed + 1)
    info: dict[str, object] = {"seed": seed, "vocab_size": VOCAB_SIZE, "head_dim": HEAD_DIM, "dtype": "bfloat16"}
    with torch.random.fork_rng(devices=[]), single_thread():
        torch.manual_seed(seed)
        built = {role: LlamaForCausalLM(gpu_model_config(role)).float() for role in ("teacher", "student")}
        for role, steps_wanted, lr in (("teacher", teacher_steps, 3e-3), ("student", student_warmup_steps, 1e-3)):
            steps, loss = train_lm(built[role], lambda: packed_rows(pool, data_rng, rows=8, width=PACK_WIDTH),
                                   steps=steps_wanted, lr=lr, max_seconds=600.0, log=emit)
            info[f"{role}_train"] = {"steps": steps, "final_loss": loss if steps else None}
    with quiet_progress_bars():
        for role, directory in (("teacher", paths.teacher_dir), ("student", paths.student_dir)):
            if directory.exists():
                shutil.rmtree(directory)
            model = built[role].to(torch.bfloat16)
            model.config.dtype = torch.bfloat16
            for key, value in (("eos_token_id", EOS_ID), ("bos_token_id", BOS_ID), ("pad_token_id", PAD_ID)):
                setattr(model.generation_config, key, value)
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            apply_default_modes(directory)
            info[role] = {"parameters": sum(p.numel() for p in model.parameters())}
    info["build_seconds"] = round(time.monotonic() - started, 3)
    (root / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (root / COMPLETE_MARKER).write_text("")
    emit(f"tiny-gpu: built in {info['build_seconds']}s under {root}: {json.dumps(info)}")
    return paths
