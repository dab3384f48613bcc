"""Precision of the learner's forward: bf16 autocast for the body on CUDA, float32 for the output head.

Why the head: the importance ratio ``exp(log pi - log mu)`` compares the learner's log-probs with the
behaviour log-probs the actor recorded, and the HF actor samples in float32. Under bf16 autocast the LM
head's matmul returns bf16 logits (8 significant bits: a logit of 20 is rounded by up to 0.06), and that
rounding goes straight into ``log pi``, so an on-policy ratio is not 1. The log-softmax was already
float32 (``protocol/sampling.py`` promotes, and the loss runs outside autocast); this makes the logits
float32 too: the head runs with autocast off on a float32 copy of the last hidden state. MiniMax-M1
(arXiv:2506.13585, section 3.2) traced its training/inference probability mismatch to the LM head's
precision and fixed it the same way.

What stays bf16, and why: the transformer body. Its rounding is most of what is left (measured on CPU
bf16 autocast, a 2-layer Llama with 1024 tokens, logits up to 5 / 15 / 30: mean |log pi - log pi_fp32|
0.0047 / 0.018 / 0.045 with a bf16 head, 0.0040 / 0.014 / 0.031 with this one). Removing it means a
float32 forward, whose matmuls run at a fraction of bf16 throughput (H100: about 67 against 990 dense
TFLOPS); a log-ratio of a few hundredths is well inside what the truncated importance weight absorbs.

The head's class is swapped in place (``Fp32Linear`` is an ``nn.Linear``): parameters, their names in
the state dict, weight tying and the FSDP/DDP wrappers stay as they were.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class Fp32Linear(torch.nn.Linear):
    """An ``nn.Linear`` that computes in float32 whatever autocast is active (float32 output)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with torch.autocast(input.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(input.float(), self.weight.float(), bias)


def fp32_output_head(model: torch.nn.Module) -> bool:
    """Make ``model``'s output head (``get_output_embeddings()``) compute in float32; True when it does.

    A head that is not a plain ``nn.Linear`` is left as it is, with a warning (the ratio then carries its
    rounding, as before).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, Fp32Linear):
        return True
    if type(head) is not torch.nn.Linear:
        log.warning("output head %s is not an nn.Linear: left in the autocast dtype", type(head).__name__)
        return False
    head.__class__ = Fp32Linear
    return True


def forward_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The learner's forward context: bf16 autocast on CUDA (the head opts out), nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
