"""Held-out evaluation of a student checkpoint: full-length reverse KL to the teacher, greedy exact match.

Both numbers answer "is the student closer to the teacher on complete answers", whatever it was trained on:
- the reverse KL is the learner's own held-out measure (`learner/evaluate.py`): the exact per-token
  KL(student || teacher) over the vocabulary on full-length student samples, prompts encoded as the actors
  encode training prompts (`protocol/prompts.py`), the same prompts and sampling seed for every checkpoint;
- exact match is the task's checker on complete greedy generations (`opd/experiment/train.py`
  `greedy_accuracy`): the answer must be right and end with EOS, so a student trained on prefixes that
  forgot how to finish scores 0.

The same code evaluates the pipeline's checkpoints and the TRL baseline's saved student.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from opd.experiment.config import EvalSettings


class Evaluator:
    """The teacher and the held-out sets, loaded once; `evaluate(model_dir)` per checkpoint."""

    def __init__(self, settings: EvalSettings, *, teacher_dir: Path, heldout_file: Path, max_new_tokens: int,
                 use_chat_template: bool | None, add_bos: bool | None, threads: int, student_dir: Path | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from opd.experiment import task
        from protocol.prompts import PromptFormat, load_prompts
        from protocol.runtime import resolve_device
        from protocol.stops import stop_token_ids
        from protocol.vocab import load_tokenizer, shared_vocab_size

        torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()  # a bar per checkpoint loaded would bury the experiment's progress
        self.settings, self.max_new_tokens = settings, max_new_tokens
        self.tokenizer = load_tokenizer(str(teacher_dir))
        self.vocab_size = shared_vocab_size(self.tokenizer)
        self.device = torch.device(resolve_device(settings.device))
        self.teacher = AutoModelForCausalLM.from_pretrained(
            teacher_dir, dtype=torch.float32, use_safetensors=True).to(self.device).eval()
        fmt = PromptFormat(use_chat_template=use_chat_template, add_bos=add_bos)
        self.kl_prompts = load_prompts(heldout_file, self.tokenizer, fmt, limit=settings.kl_prompts)
        self.problems: list[Any] = []
        if settings.checker == "task" and settings.accuracy_prompts:
            texts = task.read_prompts(heldout_file)[: settings.accuracy_prompts]
            self.problems = [task.make_problem(task.number_in_prompt(t)) for t in texts]
        self.pad_id = next(int(i) for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None)
        # where the actors stop (the student's stop ids, protocol/stops.py), not the tokenizer's EOS alone
        self.eos_id = stop_token_ids(student_dir, self.tokenizer) if student_dir else self.tokenizer.eos_token_id

    def load_student(self, model_dir: str | Path) -> Any:
        """A checkpoint's student, on the evaluation device, in eval mode (safetensors only)."""
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, use_safetensors=True).to(self.device).eval()

    def reverse_kl(self, student: Any, *, position_edges: tuple[int, ...] | None = None) -> Any:
        """The held-out full-length reverse KL (`learner.evaluate.EvalResult`; also by response position when
        `position_edges` is given): the same prompts and sampling seed for every checkpoint."""
        from learner.evaluate import heldout_reverse_kl

        return heldout_reverse_kl(student, self.teacher, self.kl_prompts, max_new_tokens=self.max_new_tokens,
                                  pad_id=self.pad_id, eos_id=self.eos_id, vocab_size=self.vocab_size,
                                  seed=self.settings.seed, batch_size=self.settings.batch_size,
                                  position_edges=position_edges)

    def evaluate(self, model_dir: str | Path) -> dict[str, Any]:
        """{"reverse_kl", "kl_tokens", "mean_response_len", "kl_by_prompt", "accuracy", "finished", "mean_greedy_tokens",
        "correct_by_problem", "seconds"}: the per-prompt and per-problem entries feed the bootstrap (stats.py)."""
        from opd.experiment.train import greedy_accuracy

        t0 = time.monotonic()
        student = self.load_student(model_dir)
        kl = self.reverse_kl(student)
        out: dict[str, Any] = {"reverse_kl": kl.reverse_kl, "kl_tokens": kl.tokens,
                               "mean_response_len": kl.mean_response_len,
                               "kl_by_prompt": {"kl_sum": kl.kl_sum_by_prompt, "tokens": kl.tokens_by_prompt}}
        if self.problems:
            acc = greedy_accuracy(student.to("cpu"), self.tokenizer, self.problems, batch_size=self.settings.batch_size,
                                  max_new_tokens=self.max_new_tokens)
            out.update(accuracy=acc["accuracy"], finished=acc["finished"], mean_greedy_tokens=acc["mean_tokens"],
                       correct_by_problem=acc["correct_by_problem"])
        out["seconds"] = round(time.monotonic() - t0, 2)
        return out
