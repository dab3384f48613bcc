"""`opd experiment premise`: is the teacher's signal on late response tokens less useful, and least early on?

The truncation papers rest on one premise: a token's OPD signal is less reliable the later it sits in the
student's answer (the student's own prefix has drifted further from anything the teacher would write), and
most so early in training. This measures it directly, for the reference row (full rollouts) of a finished
experiment, at every checkpoint it kept (the student before training included), per bucket of response
positions:

- **alignment**: cos(g_b, g_H), where g_b is the gradient of the exact per-token reverse KL over the bucket's
  positions of fresh on-policy rollouts on training prompts, and g_H the gradient of the full-length reverse KL
  on held-out prompts. Positive: a step on that bucket's signal lowers the held-out KL to first order; the
  larger, the more of the step is useful. This is "does this position's loss reduction carry to held-out
  quality", at the checkpoint.
- **consistency**: cos(g_b^A, g_b^B) between two disjoint halves of the rollouts: how much of a bucket's
  gradient is signal and how much is the draw of samples (1: the same direction from any batch; 0: noise).

`--topk K` takes the bucket gradients of the loss the OPD rows train with by default instead (top-K KL on the
teacher's top K plus one tail bucket, `learner/losses/topk_kl.py`); g_H stays the exact KL's, the quality
measured. On a real vocabulary the two can differ: the tail bucket sees none of the shape of the mass outside
the teacher's top K, so its signal on degenerate late text may be poor where the exact KL's is not.

Both treat the sampled prefix as fixed, as the OPD loss does. Nothing is trained; the checkpoints are read
where `opd experiment run` left them (`keep_weights: true`). Output: `premise.md`, `premise.json`,
`premise.png` beside the experiment's table.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
from pathlib import Path
from typing import Any

from opd.experiment.positions import add_reader_parser, bucket_names, parse_edges

TEXT = "the premise of truncation: how useful each response position's teacher signal is, over training"


def add_premise_parser(exp_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `experiment premise` under `opd experiment`."""
    p = add_reader_parser(exp_sub, "premise", TEXT + " (premise.md, premise.png)")
    p.add_argument("--row", help="the row whose checkpoints to read (default: the experiment's reference_row)")
    p.add_argument("--seeds", default="0", help="which seeds' runs, comma-separated (default %(default)s)")
    p.add_argument("--edges", required=True, help="bucket starts in response tokens, comma-separated, from 0 "
                   "(the last bucket is open): e.g. 0,40,100,200 for the binary task, 0,16,32,64 for 128 tokens")
    p.add_argument("--marks", help="which compute marks, comma-separated (0: before training; default: all kept)")
    p.add_argument("--rollouts", type=int, default=32, help="training-prompt rollouts per checkpoint (two halves; "
                   "default %(default)s)")
    p.add_argument("--heldout", type=int, default=32, help="held-out prompts for g_H (default %(default)s)")
    p.add_argument("--topk", type=int, default=0, help="bucket gradients of the top-K KL + tail bucket (the "
                   "default OPD loss) instead of the exact KL; 0: exact (default); output premise-topK.*")


def run_premise(args: argparse.Namespace) -> int:
    """Measure every kept checkpoint of the row's runs; write the table, JSON and plot; the exit code."""
    from opd.experiment.config import load_experiment

    edges = parse_edges(args.edges)
    if args.rollouts < 4 or args.heldout < 1 or args.topk < 0:
        raise ValueError("--rollouts: at least 4 (two halves); --heldout: at least 1; --topk: 0 or more")
    preset = "quick" if args.quick else args.preset
    cfg = load_experiment(args.config, preset=preset)
    row = args.row or cfg.reference_row
    results = Path(cfg.out_dir) / cfg.name
    path = results / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: run `opd experiment run` with this --config and preset first")
    seeds = {int(s) for s in args.seeds.split(",")}
    wanted = {int(m) for m in args.marks.split(",")} if args.marks else None
    runs = [r for r in json.loads(path.read_text())["runs"]
            if r["row"] == row and r["seed"] in seeds and r["status"] == "ok"]
    if not runs:
        print(f"no finished run of row {row!r} with seeds {sorted(seeds)} in {path}")
        return 2
    meter = _Meter(cfg, edges, rollouts=args.rollouts, heldout=args.heldout, topk=args.topk)
    points = []
    for run in runs:
        marks = [{"index": 0, "flops": 0.0, "step": 0, "weights": str(cfg.path("student_dir"))},
                 *({"index": m["index"], "flops": m["flops"]["total"], "step": m["step"], "weights": m["weights"]}
                   for m in run["checkpoints"] if m["index"] > 0)]
        for mark in marks:
            if wanted is not None and mark["index"] not in wanted:
                continue
            if not Path(mark["weights"]).exists():
                print(f"seed {run['seed']} mark {mark['index']}: {mark['weights']} is gone (keep_weights: false?)")
                continue
            print(f"seed {run['seed']} mark {mark['index']} (step {mark['step']})", flush=True)
            points.append({"seed": run["seed"], "mark": mark["index"], "flops": mark["flops"], "step": mark["step"],
                           **meter.measure(mark["weights"], seed=1000 * run["seed"] + mark["index"])})
    command = (f"opd experiment premise --config {shlex.quote(str(args.config))}"
               + (" --quick" if args.quick else (f" --preset {shlex.quote(preset)}" if preset else ""))
               + f" --row {row} --seeds {args.seeds}" + (f" --marks {args.marks}" if args.marks else "")
               + f" --edges {args.edges} --rollouts {args.rollouts}"
               f" --heldout {args.heldout}" + (f" --topk {args.topk}" if args.topk else ""))
    stem = results / (f"premise-top{args.topk}" if args.topk else "premise")
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "row": row, "edges": list(edges),
                                                     "topk": args.topk, "points": points}, indent=1) + "\n")
    text = markdown(points, edges, command, row, topk=args.topk)
    stem.with_suffix(".md").write_text(text)
    loss = f", top-{args.topk} KL" if args.topk else ""
    plot(points, edges, stem.with_suffix(".png"), f"{cfg.name}: {row}{loss}")
    print(text + f"\nwritten: {stem}.md, {stem}.png, {stem}.json")
    return 0


class _Meter:
    """The teacher, the prompts and the sampling, loaded once; `measure(model_dir)` per checkpoint."""

    def __init__(self, cfg: Any, edges: tuple[int, ...], *, rollouts: int, heldout: int, topk: int = 0) -> None:
        from opd.experiment.runner import pipeline_config, plan
        from opd.experiment.suite import evaluator_for
        from protocol.prompts import PromptFormat, load_prompts
        from protocol.vocab import load_tokenizer, shared_vocab_size

        spec = plan(cfg, Path(cfg.out_dir) / cfg.name)[0]
        pipe = pipeline_config(cfg, spec, shared_vocab_size(load_tokenizer(str(cfg.path("student_dir")))))
        self.ev = evaluator_for(cfg, pipe)
        fmt = PromptFormat(use_chat_template=pipe.actor.use_chat_template, add_bos=pipe.actor.add_bos)
        self.train_prompts = load_prompts(cfg.path("prompts_file"), self.ev.tokenizer, fmt)
        self.heldout = self.ev.kl_prompts[:heldout]
        self.edges, self.rollouts, self.topk = edges, rollouts, topk

    def measure(self, model_dir: str, *, seed: int) -> dict[str, Any]:
        """{"alignment", "consistency", "tokens"} per bucket (lists in bucket order; nan where a bucket is empty)."""
        student = self.ev.load_student(model_dir)
        rng = random.Random(seed)
        prompts = [self.train_prompts[rng.randrange(len(self.train_prompts))] for _ in range(self.rollouts)]
        half = len(prompts) // 2
        g_A, tok_A = self._bucket_grads(student, prompts[:half], seed)
        g_B, tok_B = self._bucket_grads(student, prompts[half:], seed + 1)
        g_H, _ = self._bucket_grads(student, self.heldout, seed + 2, whole=True)
        out: dict[str, Any] = {"alignment": [], "consistency": [], "tokens": []}
        for b in range(len(self.edges)):
            halves = [g * n for g, n in ((g_A[b], tok_A[b]), (g_B[b], tok_B[b])) if g is not None]
            both = sum(halves) if halves else None  # the whole batch's bucket gradient (token-weighted)
            out["alignment"].append(_cos(both, g_H[0]))
            out["consistency"].append(_cos(g_A[b], g_B[b]))
            out["tokens"].append(int(tok_A[b] + tok_B[b]))
        return out

    def _bucket_grads(self, student: Any, prompts: list[list[int]], seed: int,
                      whole: bool = False) -> tuple[list[Any], list[int]]:
        """Per bucket (or, `whole`, over every response token): the flat gradient of the mean per-token reverse
        KL on fresh samples of `prompts` (exact, or top-K + tail bucket for buckets when `topk`; `whole` is
        always exact: it is the held-out quality), and the bucket's token count."""
        import torch
        import torch.nn.functional as F

        from learner.evaluate import _logits, _positions, _sample
        from learner.losses.common import flat_grads

        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            ids_BT, attn_BT, mask_BR, P = _sample(student, prompts, self.ev.max_new_tokens, pad_id=self.ev.pad_id,
                                                  eos_id=self.ev.eos_id, vocab_size=self.ev.vocab_size, gen=gen)
            R = mask_BR.shape[1]
            pos_BT = _positions(attn_BT)
            t_logp_BRV = F.log_softmax(_logits(self.ev.teacher, ids_BT, attn_BT, pos_BT, self.ev.vocab_size)
                                       [:, P - 1:P - 1 + R], -1)
        s_logp_BRV = F.log_softmax(_logits(student, ids_BT, attn_BT, pos_BT, self.ev.vocab_size)[:, P - 1:P - 1 + R], -1)
        if self.topk and not whole:
            kl_BR = _topk_kl(s_logp_BRV, t_logp_BRV, mask_BR, self.topk)
        else:
            kl_BR = (s_logp_BRV.exp() * (s_logp_BRV - t_logp_BRV)).sum(-1) * mask_BR
        params = [p for p in student.parameters() if p.requires_grad]
        bucket_R = torch.bucketize(torch.arange(R), torch.tensor(self.edges), right=True) - 1
        groups = [torch.ones(R, dtype=torch.bool)] if whole else [bucket_R == b for b in range(len(self.edges))]
        tokens = [int(mask_BR[:, sel_R].sum()) for sel_R in groups]
        losses = [kl_BR[:, sel_R].sum() / n for sel_R, n in zip(groups, tokens, strict=True) if n > 0]
        flat = iter(flat_grads(losses, params))
        return [next(flat) if n > 0 else None for n in tokens], tokens


def _topk_kl(s_logp_BRV: Any, t_logp_BRV: Any, mask_BR: Any, k: int) -> Any:
    """Per token, the learner's default loss: reverse KL on the teacher's top-k ids plus one tail bucket."""
    from learner.losses.support import kl_on_support, support_logprobs

    t_top_BRK, ids_BRK = t_logp_BRV.topk(min(k, t_logp_BRV.shape[-1]), dim=-1)
    s_BRS, t_BRS = support_logprobs(s_logp_BRV, ids_BRK, t_top_BRK, mask_BR, "bucket")
    return kl_on_support(s_BRS, t_BRS) * mask_BR


def _cos(a: Any, b: Any) -> float:
    if a is None or b is None:
        return float("nan")
    a, b = a.double(), b.double()  # float32 storage (57M-entry vectors for the real pair), float64 sums
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-30))


def markdown(points: list[dict[str, Any]], edges: tuple[int, ...], command: str, row: str, topk: int = 0) -> str:
    """The table: per checkpoint (mean over seeds), alignment and consistency per bucket."""
    import numpy as np

    heads = bucket_names(edges)
    lines = [f"# The premise of truncation, measured on row `{row}`", "",
             f"Command: `{command}`. Per checkpoint (mark 0 = before training; mean over seeds, ± std when more "
             "than one), per bucket of response positions: **alignment** cos(g_bucket, g_heldout) and "
             "**consistency** cos(g_half A, g_half B) of the "
             + (f"top-{topk} KL + tail bucket's (g_heldout: the exact KL's)" if topk else "exact per-token reverse KL's")
             + " gradient (opd/experiment/premise.py). Tokens: the bucket's response tokens per checkpoint.", "",
             "| mark | step | " + " | ".join(f"align {h}" for h in heads) + " | "
             + " | ".join(f"consist. {h}" for h in heads) + " | tokens |",
             "|---" * (2 + 2 * len(heads) + 1) + "|"]
    for mark in sorted({p["mark"] for p in points}):
        at = [p for p in points if p["mark"] == mark]
        cells = []
        for key in ("alignment", "consistency"):
            vals = np.array([p[key] for p in at], dtype=float)
            mean, std = np.nanmean(vals, 0), np.nanstd(vals, 0)
            cells += [f"{m:+.3f}" + (f" ± {s:.3f}" if len(at) > 1 else "") for m, s in zip(mean, std, strict=True)]
        tokens = np.mean([p["tokens"] for p in at], 0).astype(int).tolist()
        steps = sorted({p["step"] for p in at})
        lines.append(f"| {mark} | {'/'.join(map(str, steps))} | " + " | ".join(cells) + f" | {tokens} |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict[str, Any]], edges: tuple[int, ...], out: Path, title: str) -> None:
    """Alignment and consistency against training (learner step at each mark), one line per bucket of response
    positions, mean over seeds with a ± std band: is the late buckets' line lower, and lowest at the start?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    marks = sorted({p["mark"] for p in points})
    steps = [float(np.mean([p["step"] for p in points if p["mark"] == m])) for m in marks]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, ylabel in ((axes[0], "alignment", "cos(g_bucket, g_heldout)"),
                            (axes[1], "consistency", "cos(g_half A, g_half B)")):
        for b, name in enumerate(bucket_names(edges)):
            per_mark = [np.array([p[key][b] for p in points if p["mark"] == m], dtype=float) for m in marks]
            mean = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in per_mark])
            std = np.array([np.nanstd(v) if np.isfinite(v).any() else np.nan for v in per_mark])
            color = plt.cm.viridis(b / max(len(edges) - 1, 1))
            ax.plot(steps, mean, marker="o", color=color, label=f"positions {name}")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15)
        ax.set_xlabel("learner step of the checkpoint (0: before training)")
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_title("does a position bucket's signal lower the held-out KL?")
    axes[1].set_title("how much of the bucket's gradient is signal?")
    axes[0].legend(fontsize=8)
    seeds = sorted({p["seed"] for p in points})
    fig.suptitle(f"{title} (seeds {seeds}; band: ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
