"""The peer baseline: TRL's `GKDTrainer` (trl.experimental.gkd) with the reverse KL, at the same compute budget.

What a user would otherwise run: synchronous on-policy distillation (generate with the student, score with
the teacher, train, repeat, in one process). Same student, teacher, training prompts (encoded as the actors
encode them), learning rate, warm-up, gradient clip, batch size, sampling temperature and generation budget
as the pipeline's rows (the warm-up included: the learner's, not `constant_with_warmup`, which trains step 0 at
a rate of 0); `beta=1` makes GKD's generalised JSD the reverse KL(student || teacher) over the
whole vocabulary at every generated position and `lmbda=1` trains on student samples only.

Two choices, so the comparison is like for like:
- batches hold prompts of one length (no padding in front of a prompt: the models saw position 0 at the
  prompt's first token, as the pipeline's actors give it to them);
- the loss is the mean over the batch's generated tokens (GKD would otherwise divide by the token count of
  the dataset's reference completions), the learner's token mean;
- activation (gradient) checkpointing off: TRL turns it on by default, and GKD then generates without a KV
  cache (quadratic in the answer length); these models are far too small to need it.

Compute is counted with the pipeline's formula (protocol/compute.py) from the tokens each step really ran:
generation 2 N_s (prompt + generated), teacher 2 N_t (prompt + generated), training 6 N_s (prompt +
generated), padding excluded. Weights are saved when the FLOPs reach each mark (budget x i / checkpoints)
and training stops at the budget. Evaluation is the runner's (opd/experiment/evaluate.py), on these saves.

Run as `python -m opd.experiment.trl_baseline SPEC.json` (a subprocess of the runner, so TRL, accelerate and
datasets stay out of the runner's process); exit code 3 with one line on stderr when TRL does not import.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.compute import ComputeTally, forward_flops, train_flops

UNAVAILABLE = 3


def _batches_by_length(prompts: list[list[int]], batch_size: int, seed: int, count: int) -> list[list[int]]:
    """`count` prompts arranged so that every run of `batch_size` has one prompt length (seeded shuffle)."""
    rng = random.Random(seed)
    by_len: dict[int, list[list[int]]] = {}
    for p in prompts:
        by_len.setdefault(len(p), []).append(p)
    out: list[list[int]] = []
    while len(out) < count:
        chunks = []
        for group in by_len.values():
            group = group[:]
            rng.shuffle(group)
            chunks += [group[i:i + batch_size] for i in range(0, len(group) - batch_size + 1, batch_size)]
        if not chunks:
            raise ValueError(f"no prompt length has {batch_size} prompts: lower learner.batch_size")
        rng.shuffle(chunks)
        out += [p for chunk in chunks for p in chunk]
    return out[:count]


@dataclass
class Tally:
    """What the trainer spent so far and what it kept (shared by the trainer subclass and the callback)."""

    flops: ComputeTally = field(default_factory=ComputeTally)
    marks: list[dict[str, Any]] = field(default_factory=list)
    t0: float | None = None
    steps: int = 0
    lrs: list[float] = field(default_factory=list)  # the learning rate of the first steps (the warm-up, checked)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train until the budget; returns the record (marks with their FLOPs, wall-clock, steps)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from protocol.prompts import PromptFormat, load_prompts
    from protocol.vocab import load_tokenizer

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as exc:
        raise ModuleNotFoundError(f"trl.experimental.gkd does not import ({exc}): pip install -e '.[trl]'") from exc

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(int(spec["seed"]))
    tokenizer = load_tokenizer(spec["student_dir"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fmt = PromptFormat(use_chat_template=spec.get("use_chat_template"), add_bos=spec.get("add_bos"))
    prompts = load_prompts(spec["prompts_file"], tokenizer, fmt)
    student = AutoModelForCausalLM.from_pretrained(spec["student_dir"], dtype=torch.float32, use_safetensors=True)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher_dir"], dtype=torch.float32, use_safetensors=True)
    n_s, n_t = (sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    marks, batch = sorted(float(m) for m in spec["marks"]), int(spec["batch_size"])
    # Enough batches for the budget even if every answer were one token long (training stops at the budget).
    max_batches = int(marks[-1] // (batch * (8 * n_s + 2 * n_t) * (min(len(p) for p in prompts) + 1))) + 2
    ordered = _batches_by_length(prompts, batch, int(spec["seed"]), count=batch * max_batches)
    tally = Tally()
    # The schedule is the learner's warm-up (the Trainer subclass's create_scheduler), not lr_scheduler_type.
    args = GKDConfig(
        output_dir=str(Path(spec["out"]) / "trainer"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=float(spec["lr"]), lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=float(spec["grad_clip"]), weight_decay=0.0,
        max_steps=max_batches, lmbda=float(spec["lmbda"]), beta=float(spec["beta"]),
        temperature=float(spec["temperature"]), max_new_tokens=int(spec["max_new_tokens"]), seed=int(spec["seed"]),
        report_to="none", save_strategy="no", logging_steps=10, use_cpu=spec.get("device", "cpu") == "cpu", dataloader_num_workers=0,
        disable_tqdm=True, bf16=False, fp16=False, max_length=None, activation_checkpointing=False,
    )
    trainer = _counting(GKDTrainer, tally, n_s, n_t, int(spec["warmup_steps"]))(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list([{"prompt_ids": p} for p in ordered]),
        processing_class=tokenizer, data_collator=_collator(tokenizer),
        callbacks=[_budget(tally, marks, Path(spec["out"]) / "checkpoints", tokenizer)])
    trainer.train()
    return {"marks": tally.marks, "final_flops": tally.flops.as_dict(), "steps": tally.steps, "lrs": tally.lrs,
            "wall_s": round(time.monotonic() - (tally.t0 or time.monotonic()), 3),
            "params": {"student": n_s, "teacher": n_t}}


def _counting(base: Any, tally: Tally, n_s: int, n_t: int, warmup_steps: int) -> Any:
    """GKDTrainer, counting each step's FLOPs, with one-length batches, the generated-token mean and the
    learner's warm-up (learner/step.py `warmup_factor`: step 0 trains at lr / warmup_steps, where transformers'
    `constant_with_warmup` gives it 0)."""
    import torch

    from learner.step import warmup_factor

    class Trainer(base):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)  # keeps the one-length batches

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer if optimizer is not None else self.optimizer, lambda s: warmup_factor(s, warmup_steps))
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            if len(tally.lrs) < 16:  # the rate this step trains at (the scheduler steps after the optimizer)
                tally.lrs.append(float(self.optimizer.param_groups[0]["lr"]))
            tokens = int(inputs["attention_mask"].sum())  # prompt + generated (EOS included), no padding
            tally.flops = tally.flops + ComputeTally(generation=forward_flops(n_s, tokens),
                                                     teacher=forward_flops(n_t, tokens), learner=train_flops(n_s, tokens))
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)

    return Trainer


def _budget(tally: Tally, marks: list[float], out: Path, tokenizer: Any) -> Any:
    """A callback that saves the student at each compute mark and stops training at the last."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            tally.t0 = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            tally.steps, spent = state.global_step, tally.flops
            if state.global_step % 5 == 0:
                _log(f"trl: step {state.global_step}: {spent.total:.4g} FLOPs")
            while len(tally.marks) < len(marks) and spent.total >= marks[len(tally.marks)]:
                index = len(tally.marks) + 1
                dest = out / f"c{index}"
                kw["model"].save_pretrained(dest)
                tokenizer.save_pretrained(dest)
                tally.marks.append({"index": index, "mark_flops": marks[index - 1], "flops": spent.as_dict(),
                                    "wall_s": round(time.monotonic() - (tally.t0 or 0.0), 3),
                                    "step": state.global_step, "version": state.global_step, "weights": str(dest)})
                _log(f"trl: step {state.global_step}: {spent.total:.4g} FLOPs, kept checkpoint {index}/{len(marks)}")
            if len(tally.marks) == len(marks):
                control.should_training_stop = True

    return Budget()


def _collator(tokenizer: Any) -> Any:
    """Batches of one-length prompts: `prompts` to generate from (GKD's on-policy path replaces the rest)."""
    import torch

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = {len(r["prompt_ids"]) for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"a TRL batch mixes prompt lengths {sorted(lengths)}")
        ids_BP = torch.tensor([r["prompt_ids"] for r in rows], dtype=torch.long)
        ones_BP = torch.ones_like(ids_BP)
        return {"prompts": ids_BP, "prompt_attention_mask": ones_BP, "input_ids": ids_BP, "attention_mask": ones_BP,
                "labels": torch.full_like(ids_BP, -100)}

    return collate


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m opd.experiment.trl_baseline SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    try:
        record = run(spec)
    except ModuleNotFoundError as exc:
        print(f"trl baseline unavailable: {exc}", file=sys.stderr)
        return UNAVAILABLE
    Path(spec["out"], "record.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
