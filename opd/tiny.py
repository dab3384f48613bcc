"""Tiny, fully local student/teacher assets for tests, demos and CPU smoke runs.

WHY: the pipeline must be exercised end to end without hub downloads or a GPU. Everything here is
built in code (tokenizer, models, prompts) and then saved in the ordinary Hugging Face layout, so the
rest of the system loads it through the same `from_pretrained` path it uses for real checkpoints.

The synthetic task has learnable structure so on-policy distillation has something to transfer:

- ``up 3 5:``   -> `` 7 9`` then EOS (continue an arithmetic sequence of digits to its end)
- ``down k h:`` -> `` e b`` then EOS (the same over letters, counting down)

The teacher (~0.53M params, wide and shallow: 2 layers were as good as 4 on this local task at half
the cost) is trained for a fixed number of AdamW steps (deterministic given the seed), so its
distribution is peaked on the task; the student (~0.14M params) is left at its random init
(optionally a few warm-up steps), so its reverse KL to the teacher starts high.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from opd.sft import sft_step
from protocol.files import apply_default_modes

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
ALPHABET: str = string.digits + string.ascii_lowercase + " .,:;!?-+=()"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MAX_POSITIONS = 256
PACK_WIDTH = 64
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class TinyAssets:
    """Where the built assets live (all inside the `root` given to `build_tiny_assets`)."""

    student_dir: Path
    teacher_dir: Path
    prompts_file: Path
    heldout_file: Path


@dataclass(frozen=True)
class TaskExample:
    """One task instance: the prompt text and its correct continuation (EOS not included)."""

    prompt: str
    continuation: str


def asset_paths(root: Path) -> TinyAssets:
    """The fixed layout under `root` (lets callers locate assets without rebuilding)."""
    root = Path(root)
    return TinyAssets(
        student_dir=root / "student",
        teacher_dir=root / "teacher",
        prompts_file=root / "prompts.jsonl",
        heldout_file=root / "heldout.jsonl",
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of `ALPHABET`, plus specials.

    WHY WordLevel + per-character split: no merges to learn, a fixed deterministic vocab, and decode
    round-trips exactly (the `Fuse` decoder joins characters without inserting spaces).
    """
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def sequence_examples() -> list[TaskExample]:
    """Every task instance: continue an arithmetic sequence of digits or letters to its end.

    ``up 3 5:`` -> `` 7 9``; ``down e c:`` -> `` a``; steps 1-4, 2 or 3 shown items, at least one
    item left to say. WHY this task: the next token depends only on local structure, so a tiny model
    learns it in a few hundred steps, and continuations are long enough (up to 48 tokens) for
    truncation to matter.
    """
    out: list[TaskExample] = []
    for symbols in (string.digits, string.ascii_lowercase):
        for op, ordered in (("up", symbols), ("down", symbols[::-1])):
            for step in (1, 2, 3, 4):
                for shown in (2, 3):
                    for start in range(len(ordered)):
                        seq = ordered[start::step]
                        if len(seq) <= shown:
                            continue
                        prompt = f"{op} " + " ".join(seq[:shown]) + ":"
                        out.append(TaskExample(prompt, "".join(f" {c}" for c in seq[shown:])))
    return out


def task_split(seed: int, n_train: int, n_heldout: int) -> tuple[list[TaskExample], list[TaskExample]]:
    """Disjoint train / held-out prompt sets, deterministic in `seed`."""
    examples = sequence_examples()
    if n_train + n_heldout > len(examples):
        raise ValueError(
            f"n_train_prompts + n_heldout_prompts = {n_train + n_heldout} exceeds the {len(examples)} "
            "distinct task prompts"
        )
    random.Random(seed).shuffle(examples)
    return examples[n_heldout : n_heldout + n_train], examples[:n_heldout]


def encode_example(tokenizer: PreTrainedTokenizerFast, ex: TaskExample) -> list[int]:
    """<bos> prompt continuation <eos> as token ids (the teacher's training text)."""
    ids = tokenizer.encode(ex.prompt + ex.continuation, add_special_tokens=False)
    return [BOS_ID, *ids, EOS_ID]


def packed_rows(pool: list[list[int]], rng: random.Random, *, rows: int, width: int) -> list[list[int]]:
    """`rows` training rows of exactly `width` tokens, each a run of random examples cut to fit.

    WHY packing: examples vary from ~8 to ~60 tokens; padding every batch to its longest example
    wasted about half the compute, and the build has to stay within a few seconds of CPU.
    """
    out: list[list[int]] = []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < width:
            row.extend(rng.choice(pool))
        out.append(row[:width])
    return out


def make_config(vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int) -> LlamaConfig:
    """A Llama config sized for CPU; ids match the tokenizer so generation stops on <eos>."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )


def train_lm(
    model: LlamaForCausalLM,
    sample_batch: Callable[[], list[list[int]]],
    *,
    steps: int,
    lr: float,
    max_seconds: float,
    log: Callable[[str], None],
) -> tuple[int, float]:
    """Plain next-token training (right padding, if any, is masked); returns (steps done, last loss).

    WHY step-bounded: determinism. `max_seconds` is only a safety cap for very slow machines; when it
    triggers the result differs from a full build, so it is logged.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / max(steps, 1)))
    model.train()
    started = time.monotonic()
    loss_value = float("nan")
    done = 0
    for step in range(steps):
        batch = sample_batch()
        width = max(len(ids) for ids in batch)
        ids_BT = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
        for i, ids in enumerate(batch):
            ids_BT[i, : len(ids)] = torch.tensor(ids)
        mask_BT = (ids_BT != PAD_ID).long()
        labels_BT = ids_BT.masked_fill(mask_BT == 0, -100)
        loss_value = sft_step(model, opt, sched, (ids_BT, mask_BT, labels_BT), clip=1.0)
        done = step + 1
        if time.monotonic() - started > max_seconds and done < steps:
            log(f"tiny: training stopped by the {max_seconds:.0f}s cap after {done}/{steps} steps")
            break
    model.eval()
    return done, loss_value


def write_jsonl(path: Path, examples: list[TaskExample]) -> None:
    """One `{"prompt": ..., "continuation": ...}` object per line.

    Prompt loaders read only `prompt`; `continuation` is the reference answer, for evaluation.
    """
    with path.open("w") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "continuation": ex.continuation}) + "\n")


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Train on one intra-op thread, restoring the previous setting afterwards.

    WHY: the models are too small to gain from threads, and on a shared 2-core machine two OpenMP
    threads competing with other processes ran 5-40x slower (spin-waiting), while one stays steady.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' save/load progress bars for the duration, restoring the prior setting.

    WHY: the build must print nothing by default (tests and the launcher own the console).
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_tiny_assets(
    root: Path,
    seed: int = 0,
    *,
    teacher_train_seconds: float = 120.0,
    teacher_steps: int = 240,
    student_warmup_steps: int = 0,
    batch_size: int = 8,
    n_train_prompts: int = 256,
    n_heldout_prompts: int = 32,
    log: Callable[[str], None] | None = None,
) -> TinyAssets:
    """Build (or reuse) the tokenizer, teacher, student and prompt files under `root`.

    Idempotent: if `root/.complete` exists nothing is rebuilt (arguments are then ignored). The
    marker is written last, so an interrupted build is redone from scratch. `teacher_train_seconds`
    is a wall-clock safety cap only; the teacher normally trains for exactly `teacher_steps` steps,
    so the assets are deterministic in `seed` (up to CPU float non-associativity across machines).
    Prompt files carry the reference `continuation` next to `prompt` (loaders ignore extra keys).
    Measured facts (parameter counts, losses, build time) go to `root/build_info.json`.
    """
    _check_build_args(teacher_train_seconds=teacher_train_seconds, teacher_steps=teacher_steps,
                      student_warmup_steps=student_warmup_steps, batch_size=batch_size,
                      n_train_prompts=n_train_prompts, n_heldout_prompts=n_heldout_prompts)
    emit = log or (lambda _msg: None)
    root = Path(root)
    paths = asset_paths(root)
    if (root / COMPLETE_MARKER).exists():
        return paths

    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    for d in (paths.student_dir, paths.teacher_dir):
        if d.exists():
            shutil.rmtree(d)
    tokenizer = build_tokenizer()
    train, heldout = task_split(seed, n_train_prompts, n_heldout_prompts)
    write_jsonl(paths.prompts_file, train)
    write_jsonl(paths.heldout_file, heldout)

    # The models never see held-out prompts, so held-out NLL measures generalisation.
    held = {ex.prompt for ex in heldout}
    pool = [encode_example(tokenizer, ex) for ex in sequence_examples() if ex.prompt not in held]
    data_rng = random.Random(seed + 1)

    def sample_batch() -> list[list[int]]:
        return packed_rows(pool, data_rng, rows=batch_size, width=PACK_WIDTH)

    vocab = len(tokenizer)
    info: dict[str, object] = {"seed": seed, "vocab_size": vocab}
    trained, results = _train_models(vocab, sample_batch, seed=seed, teacher_steps=teacher_steps,
                                     student_warmup_steps=student_warmup_steps,
                                     max_seconds=teacher_train_seconds, log=emit)
    _save_models(trained, results, paths, tokenizer, info, teacher_steps=teacher_steps,
                 student_warmup_steps=student_warmup_steps, log=emit)
    info["build_seconds"] = round(time.monotonic() - started, 3)
    (root / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (root / COMPLETE_MARKER).write_text("")
    emit(f"tiny: built in {info['build_seconds']}s under {root}")
    return paths


def _check_build_args(*, teacher_train_seconds: float, teacher_steps: int, student_warmup_steps: int, batch_size: int,
                      n_train_prompts: int, n_heldout_prompts: int) -> None:
    for name, value, low in (
        ("teacher_steps", teacher_steps, 0),
        ("student_warmup_steps", student_warmup_steps, 0),
        ("batch_size", batch_size, 1),
        ("n_train_prompts", n_train_prompts, 1),
        ("n_heldout_prompts", n_heldout_prompts, 1),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if teacher_train_seconds <= 0:
        raise ValueError(f"teacher_train_seconds must be > 0, got {teacher_train_seconds}")


def _train_models(
    vocab: int, sample_batch: Callable[[], list[list[int]]], *, seed: int, teacher_steps: int, student_warmup_steps: int,
    max_seconds: float, log: Callable[[str], None],
) -> tuple[dict[str, LlamaForCausalLM], dict[str, tuple[int, float]]]:
    """The teacher and the student, built from `seed` and trained on `sample_batch` (single thread, forked RNG)."""
    with torch.random.fork_rng(devices=[]), single_thread():
        torch.manual_seed(seed)
        teacher = LlamaForCausalLM(make_config(vocab, hidden=160, layers=2, heads=4, intermediate=320))
        student = LlamaForCausalLM(make_config(vocab, hidden=64, layers=2, heads=4, intermediate=256))
        results = {
            "teacher": train_lm(
                teacher,
                sample_batch,
                steps=teacher_steps,
                lr=3e-3,
                max_seconds=max_seconds,
                log=log,
            ),
            "student": train_lm(
                student,
                sample_batch,
                steps=student_warmup_steps,
                lr=1e-3,
                max_seconds=max_seconds,
                log=log,
            ),
        }
    return {"teacher": teacher, "student": student}, results


def _save_models(
    trained: dict[str, LlamaForCausalLM], results: dict[str, tuple[int, float]], paths: TinyAssets,
    tokenizer: PreTrainedTokenizerFast, info: dict[str, object], *, teacher_steps: int, student_warmup_steps: int, log: Callable[[str], None],
) -> None:
    """Each model as an HF dir with the tokenizer, readable by other users; its measured facts into `info`."""
    with quiet_progress_bars():
        for name, model, d in (
            ("teacher", trained["teacher"], paths.teacher_dir),
            ("student", trained["student"], paths.student_dir),
        ):
            model.generation_config.eos_token_id = EOS_ID
            model.generation_config.bos_token_id = BOS_ID
            model.generation_config.pad_token_id = PAD_ID
            model.save_pretrained(d)  # transformers 5 always writes safetensors
            tokenizer.save_pretrained(d)
            apply_default_modes(d)  # safetensors writes 0600: other users and servers must read the demo's models
            steps, loss = results[name]
            info[name] = {
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_steps": steps,  # below requested_steps only if the wall-clock cap hit
                "requested_steps": teacher_steps if name == "teacher" else student_warmup_steps,
                "final_loss": loss if steps else None,
            }
            log(f"tiny: {name} {info[name]}")
