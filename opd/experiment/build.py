"""`opd experiment train-teacher` / `train-student`: the task's data files and models, reproducibly.

Everything goes under one directory (default `models/task`, shipped in the repository):

    teacher/ student/     Hugging Face model dirs (safetensors) with the task's tokenizer
    prompts.jsonl         the pipeline's training prompts ({"prompt", "continuation", "answer"} lines)
    heldout.jsonl         held-out problems: never trained on by teacher, student warm-up or pipeline
    build_info.json       what was run (seed, shapes, steps, threads, versions), what it measured
                          (held-out greedy exact match, seconds) and weight fingerprints

WHY the data split is a pure function of the seed: both commands (and tests) rebuild the same split
without reading each other's output, and the held-out numbers are excluded from every training set.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from opd.experiment import task
from opd.experiment.train import (
    STUDENT_MODEL,
    TEACHER_MODEL,
    ModelSpec,
    Progress,
    Stopwatch,
    TrainSpec,
    greedy_accuracy,
    make_model,
    num_parameters,
    spec_dict,
    torch_threads,
    train,
    weights_fingerprint,
)

N_HELDOUT = 200
N_PIPELINE_PROMPTS = 512
N_TEACHER_POOL = 20000
FINGERPRINT_STEP = 5  # <= warmup_steps, so a 5-step run has the same lr schedule as the full one

TEACHER_TRAIN = TrainSpec(steps=800, batch_size=16, lr=3e-3)
STUDENT_TRAIN = TrainSpec(steps=300, batch_size=16, lr=3e-3, final_lr_fraction=1.0)
STUDENT_EXAMPLES = 256  # "a little supervised data": the warm-up draws its batches from these only


@dataclass(frozen=True)
class Split:
    """Disjoint problem sets, all derived from one seed."""

    heldout: list[task.Problem]
    pipeline: list[task.Problem]  # prompts the pipeline distils on
    teacher_pool: list[task.Problem]  # the teacher's supervised data (may overlap `pipeline`)
    student_pool: list[task.Problem]  # the student's small warm-up set


def make_split(seed: int, *, student_examples: int = STUDENT_EXAMPLES) -> Split:
    """The data split for `seed` (held-out numbers excluded from every other set)."""
    heldout = task.generate(seed * 10 + 1, N_HELDOUT)
    excluded = [p.n for p in heldout]
    return Split(
        heldout=heldout,
        pipeline=task.generate(seed * 10 + 2, N_PIPELINE_PROMPTS, exclude=excluded),
        teacher_pool=task.generate(seed * 10 + 3, N_TEACHER_POOL, exclude=excluded),
        student_pool=task.generate(seed * 10 + 4, student_examples, exclude=excluded),
    )


def write_data(out: Path, split: Split) -> None:
    """The pipeline's prompt files (the same content for the same seed, so rewriting is harmless)."""
    out.mkdir(parents=True, exist_ok=True)
    task.write_jsonl(out / "prompts.jsonl", split.pipeline)
    task.write_jsonl(out / "heldout.jsonl", split.heldout)


def fit(
    name: str,
    model_spec: ModelSpec,
    train_spec: TrainSpec,
    pool: list[task.Problem],
    *,
    seed: int,
    threads: int,
    progress: Progress | None,
    look: tuple[int, list[task.Problem], Callable[[str], None]] | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, object]]:
    """Initialise (seeded) and train one model; returns it, the tokenizer and what happened.

    `look`: (every, problems, log) logs greedy exact match on `problems` every `every` steps.
    """
    tokenizer = task.build_tokenizer()
    clock = Stopwatch()
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(model_spec, len(tokenizer))
        every = None
        if look is not None:
            n, problems, log = look

            def hook(step: int) -> None:
                r = greedy_accuracy(model, tokenizer, problems)
                log(f"{name}: step {step}: greedy exact match {100 * r['accuracy']:.0f}% on {len(problems)} "
                    f"held-out problems ({clock.seconds():.0f} s)")

            every = (n, hook)
        info = train(model, tokenizer, pool, train_spec, seed=seed, progress=progress, every=every,
                     fingerprint_at=FINGERPRINT_STEP if train_spec.steps >= FINGERPRINT_STEP else None)
    info = {"role": name, "seed": seed, "threads": threads, **spec_dict(model_spec, train_spec),
            "parameters": num_parameters(model), "train_seconds": clock.seconds(), **info}
    return model, tokenizer, info


def evaluate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, problems: list[task.Problem],
             threads: int) -> dict[str, float]:
    """Held-out greedy exact match (with the same thread count as training)."""
    clock = Stopwatch()
    with torch_threads(threads):
        result = greedy_accuracy(model, tokenizer, problems)
    result.pop("correct_by_problem", None)  # build_info.json keeps the totals only
    return {**result, "seconds": clock.seconds()}


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> str:
    """save_pretrained (safetensors) model and tokenizer; returns the weights' sha256 fingerprint."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():  # transformers writes weights 0600; others (containers, servers) must read them
        path.chmod(0o666 & ~umask)
    return str(weights_fingerprint(model)["sha256"])


def record(out: Path, role: str, info: dict[str, object]) -> None:
    """Merge one role's facts into build_info.json (the other role's entry is kept)."""
    path = out / "build_info.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["task"] = {"q_width": task.Q_WIDTH, "bits_width": task.BITS_WIDTH, "min_bits": task.MIN_BITS,
                    "max_bits": task.MAX_BITS, "heldout": N_HELDOUT, "pipeline_prompts": N_PIPELINE_PROMPTS}
    data[role] = {**info, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                       "python": platform.python_version(), "machine": platform.machine()}}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_role(
    role: str, out: Path, *, seed: int, steps: int | None, threads: int, examples: int | None = None,
    progress: Progress | None = None, log: Callable[[str], None] = print, look_every: int | None = None,
    eval_problems: int = N_HELDOUT,
) -> dict[str, object]:
    """Train the teacher or the (warmed-up) student into `out/<role>`, evaluate it, record it.

    `look_every`: also log greedy exact match on 32 held-out problems every that many steps.
    """
    split = make_split(seed, student_examples=examples or STUDENT_EXAMPLES)
    write_data(out, split)
    if role == "teacher":
        model_spec, train_spec, pool, model_seed = TEACHER_MODEL, TEACHER_TRAIN, split.teacher_pool, seed
    else:
        model_spec, train_spec, pool, model_seed = STUDENT_MODEL, STUDENT_TRAIN, split.student_pool, seed + 1
    if steps is not None:
        train_spec = replace(train_spec, steps=steps)
    look = (look_every, split.heldout[:32], log) if look_every else None
    model, tokenizer, info = fit(role, model_spec, train_spec, pool, seed=model_seed, threads=threads,
                                 progress=progress, look=look)
    info["examples"] = len(pool)
    info["final_sha256"] = save(model, tokenizer, out / role)
    heldout = split.heldout[:eval_problems]
    log(f"{role}: greedy answers to {len(heldout)} held-out problems...")
    info["heldout"] = evaluate(model, tokenizer, heldout, threads)
    record(out, role, info)
    return info
