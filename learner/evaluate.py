"""Held-out evaluation: full-length reverse KL(student || teacher) on the student's own samples.

Why full-distribution KL and full length: training sees truncated prefixes scored on one sampled
token each; the question a user asks is whether the student got closer to the teacher on complete
responses. So we sample full-length responses from the student (same prompts and seed every time,
to keep the comparison paired) and average the exact per-token KL over the vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class EvalResult:
    reverse_kl: float  # nats per response token
    tokens: int
    mean_response_len: float


def load_heldout(path: str, tokenizer, limit: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Held-out prompts as token ids (the same JSONL format as training prompts)."""
    out: list[list[int]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected a JSON object with a 'prompt' string ({exc})") from None
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        out.append(list(ids))
        if len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no held-out prompts")
    return out


@torch.no_grad()
def heldout_reverse_kl(
    student: torch.nn.Module, teacher: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
    pad_id: int, eos_id: int | None, seed: int = 1234, batch_size: int = 16,
) -> EvalResult:
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    total_kl, total_tokens, total_len = 0.0, 0, 0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        P = max(len(p) for p in chunk)
        ids_BP = torch.full((len(chunk), P), pad_id, dtype=torch.long)
        attn_BP = torch.zeros((len(chunk), P), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding, so every row continues at the same position
            ids_BP[i, P - len(p):] = torch.tensor(p)
            attn_BP[i, P - len(p):] = 1
        ids_BT, attn_BT = ids_BP.to(device), attn_BP.to(device)
        resp_mask_list = []
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = student(input_ids=ids_BT, attention_mask=attn_BT, position_ids=_positions(attn_BT)).logits[:, -1].float()
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(device).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            resp_mask_list.append(~done)
            ids_BT = torch.cat([ids_BT, nxt[:, None]], dim=1)
            attn_BT = torch.cat([attn_BT, (~done).long()[:, None]], dim=1)
            if eos_id is not None:
                done = done | (nxt == eos_id)
            if done.all():
                break
        resp_mask_BR = torch.stack(resp_mask_list, dim=1)
        R = resp_mask_BR.shape[1]
        # logits at position t predict token t+1: response positions are P-1 .. P+R-2
        pos_BT = _positions(attn_BT)
        s_logits = student(input_ids=ids_BT, attention_mask=attn_BT, position_ids=pos_BT).logits[:, P - 1:P - 1 + R].float()
        t_logits = teacher(input_ids=ids_BT, attention_mask=attn_BT, position_ids=pos_BT).logits[:, P - 1:P - 1 + R].float()
        s_logp, t_logp = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
        kl_BR = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
        total_kl += float((kl_BR * resp_mask_BR).sum())
        total_tokens += int(resp_mask_BR.sum())
        total_len += int(resp_mask_BR.sum())
    student.train(was_training)
    return EvalResult(reverse_kl=total_kl / max(total_tokens, 1), tokens=total_tokens,
                      mean_response_len=total_len / len(prompts))


def _positions(attn_BT: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, so a padded row sees the positions an unpadded one would."""
    return (attn_BT.cumsum(-1) - 1).clamp(min=0)
