"""One supervised (next-token, cross-entropy) optimizer step, shared by the model builders.

WHY one function: opd/tiny.py (the test and demo models) and opd/experiment/train.py (the task's
shipped teacher and student) must take exactly the same step; both builds are reproduced byte for byte
from their seeds, so the order of operations here (clip before step, scheduler after optimizer,
gradients set to None) is part of the recorded recipe and must not change.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def sft_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    clip: float = 1.0,
) -> float:
    """Forward, backward, clip the gradient norm to `clip`, step, schedule, zero; returns the loss.

    `batch` is (input ids, attention mask, labels), each [B, T]; label -100 is ignored by the loss.
    """
    ids_BT, attn_BT, labels_BT = batch
    loss = model(input_ids=ids_BT, attention_mask=attn_BT, labels=labels_BT).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
