"""How far the loss's top-k bucket KL is from the true reverse KL on a real vocabulary.

On the student's own samples (temperature 1, the chat template on, the prompts of configs/smollm2-cpu.yaml)
this computes, per response token, three numbers for the same states:
- the true reverse KL, KL(q || p) summed over all vocabulary ids (both models' full logits);
- the sampled-token estimate the learner now reports, log q(y) - log p(y) at the sampled token y;
- the restricted-support KL the top-k loss sees (`learner.losses.topk_kl`: the teacher's top-k + one bucket),
and the student's probability mass outside the teacher's top-k. With `--grad`, also how well each view's
*gradient* points where the exact reverse KL's does (cosine over the student's parameters, on the same
states): the number that says whether a top-k loss trains toward the right student, and what the cache pays for
it (bytes per scored token at each k). One command, one seed per run:

    .venv/bin/python bench/kl_views.py --pair models/smollm2 --prompts 8 --tokens 64 --k 8 32 128
    .venv/bin/python bench/kl_views.py --pair models/smollm2 --prompts 8 --tokens 64 --k 8 32 128 256 --grad
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default=str(REPO / "models" / "smollm2"), help="dir with teacher/ and student/")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the numbers as JSON")
    parser.add_argument("--grad", action="store_true", help="also each view's gradient cosine with the exact KL's")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.evaluate import _logits, _positions, _sample
    from learner.losses.topk_kl import topk_kl_loss
    from protocol.prompts import PromptFormat, load_prompts
    from protocol.stops import stop_token_ids

    pair = Path(args.pair)
    tokenizer = AutoTokenizer.from_pretrained(pair / "student")
    prompts = load_prompts(REPO / "models" / "smollm2" / "prompts.jsonl", tokenizer, PromptFormat(), limit=args.prompts)
    student = AutoModelForCausalLM.from_pretrained(pair / "student", dtype=torch.float32, use_safetensors=True).eval()
    teacher = AutoModelForCausalLM.from_pretrained(pair / "teacher", dtype=torch.float32, use_safetensors=True).eval()
    V = len(tokenizer)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        ids_BT, attn_BT, mask_BR, P = _sample(student, prompts, args.tokens, pad_id=int(tokenizer.pad_token_id),
                                              eos_id=stop_token_ids(pair / "student", tokenizer), vocab_size=V, gen=gen)
        R = mask_BR.shape[1]
        pos_BT = _positions(attn_BT)
        s_BRV = _logits(student, ids_BT, attn_BT, pos_BT, V)[:, P - 1:P - 1 + R]
        t_BRV = _logits(teacher, ids_BT, attn_BT, pos_BT, V)[:, P - 1:P - 1 + R]
    logq, logp = F.log_softmax(s_BRV, -1), F.log_softmax(t_BRV, -1)
    y_BR = ids_BT[:, P:P + R]
    n = mask_BR.sum()
    true_kl = float(((logq.exp() * (logq - logp)).sum(-1) * mask_BR).sum() / n)
    sampled = float(((logq - logp).gather(-1, y_BR[..., None]).squeeze(-1) * mask_BR).sum() / n)
    out: dict[str, object] = {"tokens": int(n), "true_reverse_kl": true_kl, "sampled_estimate": sampled, "by_k": {}}
    for k in args.k:
        top_lp, top_ids = logp.topk(k, dim=-1)
        bucket = float(topk_kl_loss(s_BRV, top_ids, top_lp, mask_BR, direction="reverse").reverse_kl)
        outside = float(((1 - logq.exp().gather(-1, top_ids).sum(-1)) * mask_BR).sum() / n)
        out["by_k"][k] = {"bucket_kl": bucket, "student_mass_outside_topk": outside}  # type: ignore[index]
    print(f"{int(n)} response tokens of the student's own samples ({args.prompts} prompts, seed {args.seed})")
    print(f"true reverse KL (all {V} ids)      {true_kl:.3f} nats/token")
    print(f"sampled-token estimate (reported)   {sampled:.3f}")
    for k, row in out["by_k"].items():  # type: ignore[union-attr]
        print(f"top-{k:<3} bucket KL (the loss's)     {row['bucket_kl']:.3f}   student mass outside the teacher's "
              f"top-{k}: {100 * row['student_mass_outside_topk']:.1f}%")
    if args.grad:
        out["gradient_cosine"] = grads = gradient_agreement(student, ids_BT, attn_BT, pos_BT, P, mask_BR, logp, args.k, V)
        print("gradient cosine with the exact reverse KL's (student parameters, same states):")
        for name, cos in grads.items():
            print(f"  {name:<28} {cos:+.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def gradient_agreement(student: torch.nn.Module, ids_BT: torch.Tensor, attn_BT: torch.Tensor, pos_BT: torch.Tensor,
                       P: int, mask_BR: torch.Tensor, logp_BRV: torch.Tensor, ks: list[int],
                       V: int) -> dict[str, float]:
    """cos(grad of a view's loss, grad of the exact reverse KL) for the sampled-token estimator (the
    `sampled_reverse_kl` loss's score-function gradient, no baseline) and the top-k losses (bucket tail, and
    `topk_sampled_tail`: the bucket plus the sampled token's correction).

    One forward with gradient; every loss reuses it. A cosine near 1: that view trains toward the student the
    exact KL would; near 0: its step is mostly elsewhere."""
    from learner.evaluate import _logits
    from learner.losses.common import flat_grads
    from learner.losses.topk_kl import topk_kl_loss
    from learner.losses.topk_sampled_tail import topk_sampled_tail_loss

    params = [p for p in student.parameters() if p.requires_grad]
    R = mask_BR.shape[1]
    s_BRV = _logits(student, ids_BT, attn_BT, pos_BT, V)[:, P - 1:P - 1 + R]
    logq = F.log_softmax(s_BRV, -1)
    n = mask_BR.sum()
    y_BR = ids_BT[:, P:P + R]
    logq_y = logq.gather(-1, y_BR[..., None]).squeeze(-1)
    advantage_BR = (logq_y - logp_BRV.gather(-1, y_BR[..., None]).squeeze(-1)).detach()
    losses = {"exact reverse KL": ((logq.exp() * (logq - logp_BRV)).sum(-1) * mask_BR).sum() / n,
              "sampled token (score fn.)": (advantage_BR * logq_y * mask_BR).sum() / n}
    for k in ks:
        top_lp, top_ids = logp_BRV.topk(k, dim=-1)
        losses[f"top-{k} + tail bucket"] = topk_kl_loss(s_BRV, top_ids, top_lp, mask_BR, direction="reverse").loss
        # on policy (the student drew y): behaviour log-prob = the student's own, importance weight 1
        losses[f"top-{k} + sampled tail"] = topk_sampled_tail_loss(
            s_BRV, y_BR, logq_y.detach(), logp_BRV.gather(-1, y_BR[..., None]).squeeze(-1), top_ids, top_lp, mask_BR,
            is_cap=math.inf).loss
    flat = dict(zip(losses, flat_grads(list(losses.values()), params, torch.float64), strict=True))
    exact = flat.pop("exact reverse KL")
    return {name: float(g @ exact / (g.norm() * exact.norm()).clamp(min=1e-30)) for name, g in flat.items()}


if __name__ == "__main__":
    main()
