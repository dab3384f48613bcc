"""Supervised training and greedy exact-match evaluation of the task's teacher and student.

WHY its own trainer (not opd/tiny.py's): the task's sequences are 180-410 tokens, so batches are
padded per batch (no packing: the models must see position 0 at the prompt's first token, exactly as
at generation time), the loss covers answer tokens only (prompts are random numbers, nothing to learn),
and quality is measured the way the experiment measures it: exact match of complete greedy answers.

Deterministic given the seed and the thread count: data order, initialisation and dropout-free
training are all seeded, and `torch_threads` is set for the duration (CPU reductions can split
differently with a different number of threads, which changes the last bits of the weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opd.experiment.task import EOS_ID, LINE_CHARS, MAX_BITS, PAD_ID, Problem, is_correct
from opd.sft import sft_step

MAX_POSITIONS = 512
MAX_NEW_TOKENS = (MAX_BITS + 1) * LINE_CHARS + 8  # the longest answer plus a little slack

Progress = Callable[[int, int, float], None]  # (steps done, total steps, last loss)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a Llama-style decoder (RoPE positions, SwiGLU, RMSNorm)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class TrainSpec:
    """One supervised run: AdamW, linear warm-up then cosine decay to `final_lr_fraction`, clipped at 1.

    `final_lr_fraction=1` keeps the rate constant after warm-up, so that a run of k steps is exactly
    the first k steps of a longer one (how the student's warm-up length was chosen: see build.py).
    """

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 20
    weight_decay: float = 0.0
    final_lr_fraction: float = 0.1


TEACHER_MODEL = ModelSpec(hidden=128, layers=4, heads=4, intermediate=512)
STUDENT_MODEL = ModelSpec(hidden=64, layers=2, heads=4, intermediate=256)


def make_model(spec: ModelSpec, vocab_size: int) -> LlamaForCausalLM:
    """A randomly initialised model with the tokenizer's special ids (no BOS, see task.py)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def encode(tokenizer: PreTrainedTokenizerFast, problem: Problem) -> tuple[list[int], int]:
    """(prompt + answer + EOS ids, prompt length): the training text and where the loss starts."""
    prompt = tokenizer.encode(problem.prompt, add_special_tokens=False)
    answer = tokenizer.encode(problem.answer, add_special_tokens=False)
    return [*prompt, *answer, EOS_ID], len(prompt)


def collate(examples: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids_BT, attention_BT, labels_BT); labels are -100 on prompts and padding."""
    width = max(len(ids) for ids, _ in examples)
    ids_BT = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    attn_BT = torch.zeros((len(examples), width), dtype=torch.long)
    labels_BT = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(examples):
        ids_BT[i, : len(ids)] = torch.tensor(ids)
        attn_BT[i, : len(ids)] = 1
        labels_BT[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return ids_BT, attn_BT, labels_BT


def lr_factor(step: int, spec: TrainSpec) -> float:
    """Linear warm-up, then cosine from 1 down to `final_lr_fraction` at the last step."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    span = max(spec.steps - spec.warmup_steps, 1)
    low = spec.final_lr_fraction
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * (step - spec.warmup_steps) / span))


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[Problem],
    spec: TrainSpec,
    *,
    seed: int,
    progress: Progress | None = None,
    fingerprint_at: int | None = None,
    every: tuple[int, Callable[[int], None]] | None = None,
) -> dict[str, object]:
    """Train on batches drawn (with replacement, seeded) from `problems`; returns what happened.

    `fingerprint_at`: also record `weights_fingerprint` after that many steps, so that a short run of
    this same code path can later be compared with the run that produced shipped weights.
    `every`: (n, hook) calls hook(step) every n steps (e.g. a held-out look); the hook must not touch
    the seeded state (greedy evaluation does not), so the run's weights are the same with or without it.
    """
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, spec))
    info: dict[str, object] = {}
    loss_value = float("nan")
    model.train()
    for step in range(spec.steps):
        batch = [rng.choice(problems) for _ in range(spec.batch_size)]
        loss_value = sft_step(model, opt, sched, collate([encode(tokenizer, p) for p in batch]), clip=1.0)
        if fingerprint_at is not None and step + 1 == fingerprint_at:
            info["fingerprint_step"] = fingerprint_at
            info["weights_fingerprint"] = weights_fingerprint(model)
        if progress is not None:
            progress(step + 1, spec.steps, loss_value)
        if every is not None and (step + 1) % every[0] == 0 and step + 1 < spec.steps:
            every[1](step + 1)
            model.train()
    model.eval()
    info["final_loss"] = loss_value
    return info


def weights_fingerprint(model: torch.nn.Module) -> dict[str, object]:
    """An exact hash of the weights, plus a per-tensor summary that survives float noise.

    WHY both: the hash proves bit-identical reproduction on the same kind of CPU; the summaries (sum
    and sum of squares per tensor) let a test on a different CPU, whose kernels round differently,
    still tell "same training run" from "different code" with a tolerance.
    """
    digest = hashlib.sha256()
    summary: dict[str, list[float]] = {}
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().float().contiguous()
        digest.update(name.encode())
        digest.update(data.numpy().tobytes())
        summary[name] = [float(data.sum()), float((data * data).sum())]
    return {"sha256": digest.hexdigest(), "summary": summary}


@torch.no_grad()
def greedy_accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[Problem],
    *,
    batch_size: int = 64,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, float]:
    """Exact-match accuracy of complete greedy answers, and the mean answer length in tokens.

    `correct_by_problem`: "0"/"1" per problem, in the order given (the experiment's bootstrap resamples
    problems: opd/experiment/stats.py).

    Prompts are batched by length, so no padding is needed and every prompt starts at position 0, as
    in training and as the pipeline's actors encode it (no BOS).
    """
    model.eval()
    by_len: dict[int, list[tuple[int, Problem]]] = {}
    for i, p in enumerate(problems):
        by_len.setdefault(len(tokenizer.encode(p.prompt, add_special_tokens=False)), []).append((i, p))
    correct, finished_count, tokens = 0, 0, 0
    right = ["0"] * len(problems)
    for group in by_len.values():
        for start in range(0, len(group), batch_size):
            chunk = [p for _, p in group[start : start + batch_size]]
            where = [i for i, _ in group[start : start + batch_size]]
            ids_BP = torch.tensor([tokenizer.encode(p.prompt, add_special_tokens=False) for p in chunk])
            out_BT = model.generate(
                input_ids=ids_BP, attention_mask=torch.ones_like(ids_BP), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
            )
            for i, p, row in zip(where, chunk, out_BT[:, ids_BP.shape[1] :].tolist(), strict=True):
                finished = EOS_ID in row
                response = row[: row.index(EOS_ID)] if finished else row
                text = tokenizer.decode(response, skip_special_tokens=True)
                ok = is_correct(p.prompt, text, finished=finished)
                right[i] = "1" if ok else "0"
                correct += ok
                finished_count += finished
                tokens += len(response) + finished
    n = max(len(problems), 1)
    return {"accuracy": correct / n, "finished": finished_count / n, "mean_tokens": tokens / n,
            "correct": correct, "total": len(problems), "correct_by_problem": "".join(right)}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use `n` intra-op threads for the duration, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spec_dict(model: ModelSpec, train_spec: TrainSpec) -> dict[str, object]:
    return {"model": asdict(model), "train": asdict(train_spec)}


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def seconds(self) -> float:
        return round(time.monotonic() - self.start, 1)
