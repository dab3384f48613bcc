"""`python -m opd.experiment.loss_probe`: which distillation loss stays stable on the experiment task, and why.

WHY in-process and not through the pipeline: a loss's stability is a property of its gradient, not of
Redis or the actors, and a diagnosis needs numbers the pipeline does not log (the advantage distribution,
the exact training-side KL, how much probability the student keeps on EOS where the teacher ends). So this
runs the learner's own `Trainer` (the same loss components, AdamW, gradient clip and token-mean
normalisation) on rollouts of the pipeline's own engine (`actors/engines/hf.py`) scored by the pipeline's
own teacher scorer (`cache/scorers/hf.py`), one variant after the other on the same prompts and sampling
seeds. Actor lag is modelled: the sampler's weights are refreshed from the learner every `--lag` steps,
so batches are up to `lag - 1` versions stale, as in the asynchronous pipeline (where importance ratios
spike after large steps).

Two measurements:
- ``train``: each variant trains its own copy of the student; per step the advantage distribution, the
  exact KL(student || teacher) on the visited positions, the IS ratio, response lengths and EOS health;
  held-out full-length reverse KL and greedy exact match every `--eval-every` steps.
- ``grads``: at the untrained student, every variant's gradient on the *same* on-policy batches against
  the exact full-vocabulary reverse-KL gradient (cosine per batch, and of the average over batches).

Outputs under `--out`: steps.jsonl, grads.json, summary.md (mean +- std over seeds). See
docs/experiments.md, "Loss stability", for the numbers and the commands that produced them.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

VOCAB = -1  # teacher_k placeholder: the whole vocabulary

# name -> (learner.loss, teacher top-k the variant is fed with)
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "sampled-nobaseline": ({"kind": "sampled_reverse_kl", "baseline": "none", "advantage_clip": None}, 0),
    "sampled-loo": ({"kind": "sampled_reverse_kl", "baseline": "batch", "advantage_clip": None}, 0),
    "sampled-clip5": ({"kind": "sampled_reverse_kl", "baseline": "none", "advantage_clip": 5.0}, 0),
    "sampled-loo-clip5": ({"kind": "sampled_reverse_kl", "baseline": "batch", "advantage_clip": 5.0}, 0),
    "sampled-loo-clip2": ({"kind": "sampled_reverse_kl", "baseline": "batch", "advantage_clip": 2.0}, 0),
    "sampled-loo-clip1": ({"kind": "sampled_reverse_kl", "baseline": "batch", "advantage_clip": 1.0}, 0),
    "sampled-topk8b": ({"kind": "sampled_reverse_kl", "baseline": "topk", "advantage_clip": None}, 8),
    "sampled-exactb": ({"kind": "sampled_reverse_kl", "baseline": "topk", "advantage_clip": None}, VOCAB),
    "topk8": ({"kind": "topk_kl", "tail": "bucket"}, 8),
    "topk32": ({"kind": "topk_kl", "tail": "bucket"}, 32),
    "exact": ({"kind": "topk_kl", "tail": "bucket"}, VOCAB),
}
# What `opd up` trains with when learner.loss is unset (opd/config.py): with the default teacher.topk, and with 0.
DEFAULTS: dict[str, list[str]] = {"default": [], "default-topk0": ["teacher.topk=0"]}


def resolve(name: str, vocab: int) -> tuple[dict[str, Any], int]:
    """(learner.loss, teacher top-k) of a variant name: one of VARIANTS, or a DEFAULTS entry, resolved through
    the composed config exactly as `opd up` resolves it."""
    if name in DEFAULTS:
        from opd.config import load_config

        cfg = load_config(None, DEFAULTS[name])
        return cfg.learner.loss.model_dump(), cfg.teacher.topk
    loss, k = VARIANTS[name]
    return loss, vocab if k == VOCAB else k


class Env:
    """Teacher scorer and model, tokenizer, prompts and held-out sets, loaded once."""

    def __init__(self, models: Path, *, eval_kl: int, eval_acc: int) -> None:
        from transformers import AutoModelForCausalLM

        from actors.engines.hf import HFRolloutEngine
        from cache.scorers.hf import HFTeacherScorer
        from opd.experiment import task

        self.models = models
        self.tokenizer = task.build_tokenizer()
        self.vocab = len(self.tokenizer)
        self.scorer = HFTeacherScorer(models / "teacher")
        self.teacher = AutoModelForCausalLM.from_pretrained(models / "teacher", dtype=torch.float32,
                                                            use_safetensors=True).eval()
        self.engine = HFRolloutEngine(models / "student")
        enc = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731 (no BOS: task.py)
        self.prompts = [enc(t) for t in task.read_prompts(models / "prompts.jsonl")]
        heldout = task.read_prompts(models / "heldout.jsonl")
        self.kl_prompts = [enc(t) for t in heldout[:eval_kl]]
        self.problems = [task.make_problem(task.number_in_prompt(t)) for t in heldout[:eval_acc]]
        self.eos = task.EOS_ID

    def student(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.models / "student", dtype=torch.float32,
                                                    use_safetensors=True)


def rollouts(env: Env, sampler: torch.nn.Module, prompts: list[list[int]], seed: int) -> tuple[list[Any], dict[str, float]]:
    """Sample full rollouts with `sampler`, score them with the teacher (all V log-probs); records + diagnostics."""
    from opd.experiment.train import MAX_NEW_TOKENS

    env.engine.model = sampler
    gens = env.engine.generate(prompts, [MAX_NEW_TOKENS] * len(prompts), seed=seed)
    seqs = [np.array(p + g.response_ids, dtype=np.int64) for p, g in zip(prompts, gens, strict=True)]
    scores = env.scorer.score(seqs, [len(p) for p in prompts], env.vocab)
    records = [SimpleNamespace(
        prompt_ids_P=np.array(p, dtype=np.int64), response_ids_R=np.array(g.response_ids, dtype=np.int64),
        behaviour_logprobs_R=np.array(g.logprobs, dtype=np.float32), teacher_logprobs_R=s.logprobs_R,
        topk_ids_RK=s.topk_ids_RK, topk_logprobs_RK=s.topk_logprobs_RK, policy_version=0, temperature=1.0, top_p=1.0,
    ) for p, g, s in zip(prompts, gens, scores, strict=True)]
    adv = np.concatenate([r.teacher_logprobs_R - r.behaviour_logprobs_R for r in records]).astype(np.float64)
    top = np.sort(np.abs(adv))[::-1][: max(len(adv) // 100, 1)]
    diag = {"adv_mean": adv.mean(), "adv_std": adv.std(), "adv_min": adv.min(), "adv_p01": np.quantile(adv, 0.01),
            "adv_frac_below_-5": float((adv < -5).mean()), "adv_top1pct_share": top.sum() / max(np.abs(adv).sum(), 1e-12),
            "finished": float(np.mean([g.finished for g in gens])),
            "mean_len": float(np.mean([len(g.response_ids) for g in gens]))}
    return records, {k: float(v) for k, v in diag.items()}


def with_k(records: list[Any], k: int) -> list[Any]:
    """The records as a teacher with `teacher.topk: k` would send them (scores are sorted, most likely first)."""
    return [SimpleNamespace(**{**vars(r), "topk_ids_RK": r.topk_ids_RK[:, :k], "topk_logprobs_RK": r.topk_logprobs_RK[:, :k]})
            for r in records]


@torch.no_grad()
def student_diagnostics(env: Env, student: torch.nn.Module, records: list[Any]) -> dict[str, float]:
    """Exact KL(pi || p_T) and entropy of the learner's student on the visited positions, and its EOS health:
    mean pi(EOS) where the teacher puts more than half its mass on EOS."""
    from learner.batching import Sample, collate

    batch = collate([Sample.from_record(r) for r in records], pad_id=0)
    logits_BTV = student(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits.float()
    mask_BT = batch.response_mask_BT[:, 1:]
    logq_NV = torch.log_softmax(logits_BTV[:, :-1][mask_BT], dim=-1)
    ids_NV, lp_NV = batch.topk_ids_BTK[:, 1:][mask_BT], batch.topk_logprobs_BTK[:, 1:][mask_BT]
    logp_NV = torch.full_like(logq_NV, -1e4).scatter(-1, ids_NV, lp_NV)
    q_NV = logq_NV.exp()
    kl_N = (q_NV * (logq_NV - logp_NV)).sum(-1)
    ends_N = logp_NV[:, env.eos] > np.log(0.5)
    return {"train_kl_exact": float(kl_N.mean()), "train_kl_max_token": float(kl_N.max()),
            "entropy": float(-(q_NV * logq_NV).sum(-1).mean()),
            "eos_prob_where_teacher_ends": float(q_NV[ends_N, env.eos].mean()) if bool(ends_N.any()) else float("nan")}


def evaluate(env: Env, student: torch.nn.Module) -> dict[str, float]:
    """Held-out full-length reverse KL (the learner's own measure) and greedy exact match."""
    from learner.evaluate import heldout_reverse_kl
    from opd.experiment.train import MAX_NEW_TOKENS, greedy_accuracy

    kl = heldout_reverse_kl(student, env.teacher, env.kl_prompts, max_new_tokens=MAX_NEW_TOKENS, pad_id=0,
                            eos_id=env.eos, vocab_size=env.vocab, seed=1234, batch_size=16)
    acc = greedy_accuracy(student, env.tokenizer, env.problems)
    student.train()
    return {"heldout_kl": kl.reverse_kl, "heldout_len": kl.mean_response_len, "accuracy": acc["accuracy"],
            "greedy_finished": acc["finished"]}


def make_trainer(student: torch.nn.Module, loss: dict[str, Any], lr: float, batch: int) -> Any:
    """The learner's own optimizer step (AdamW, grad clip 1, token-mean loss) around `student`."""
    from learner.config import LearnerConfig
    from learner.distributed import Distributed, TrainModel
    from learner.step import Trainer

    cfg = LearnerConfig.model_validate({"loss": loss, "lr": lr, "batch_size": batch, "micro_batch_tokens": 1 << 16})
    dist = Distributed()
    return Trainer(cfg, TrainModel(student, dist, fsdp=False), dist, torch.device("cpu"), pad_id=0)


def train_run(env: Env, name: str, seed: int, args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    """One variant, one seed: `args.steps` steps; a row per step (held-out numbers on evaluation steps)."""
    loss, k = resolve(name, env.vocab)
    torch.manual_seed(seed)
    student = env.student()
    sampler = copy.deepcopy(student).eval()
    trainer = make_trainer(student, loss, args.lr, args.batch)
    rng, rows = random.Random(seed), []
    for step in range(args.steps + 1):
        row: dict[str, Any] = {"variant": name, "seed": seed, "step": step}
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            row.update(evaluate(env, student))
        if step == args.steps:
            rows.append(row)
            break
        if step % args.lag == 0:
            sampler.load_state_dict(student.state_dict())
        records, diag = rollouts(env, sampler, rng.sample(env.prompts, args.batch), seed * 1_000_003 + step)
        row.update(diag, **student_diagnostics(env, student, records))
        stats = trainer.step(with_k(records, k))
        row.update(loss=stats.loss, train_kl_estimate=stats.reverse_kl, ratio_mean=stats.ratio_mean,
                   ratio_max=stats.ratio_max, clip_fraction=stats.clip_fraction)
        rows.append(row)
        if "heldout_kl" in row or not np.isfinite(row["train_kl_exact"]):
            log(f"{name} seed {seed} step {step}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()
                                                                 if isinstance(v, float)))
    return rows


def grad_probe(env: Env, names: list[str], batches: int, seed: int) -> dict[str, Any]:
    """Every variant's gradient at the untrained student on the same on-policy batches vs the exact one.

    A batch's gradient is the loss component's (`cfg.loss.build()`), token-mean over the batch, as the
    learner computes it; ``cos_of_means`` compares the averages over batches (an unbiased estimator's
    tends to 1 as batches grow, its per-batch cosine measures its noise).
    """
    from learner.batching import Sample, collate
    from learner.config import LearnerConfig

    student = env.student().train()
    params = [p for p in student.parameters() if p.requires_grad]
    rng, grads = random.Random(seed), {n: [] for n in dict.fromkeys([*names, "exact"])}
    for b in range(batches):
        records, _ = rollouts(env, copy.deepcopy(student).eval(), rng.sample(env.prompts, 8), seed * 7919 + b)
        for name in grads:
            loss_cfg, k = resolve(name, env.vocab)
            batch = collate([Sample.from_record(r) for r in with_k(records, k)], 0)
            student.zero_grad(set_to_none=True)
            logits_BTV = student(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
            loss = LearnerConfig.model_validate({"loss": loss_cfg}).loss.build()
            loss(batch, logits_BTV, weights_BT=None, normalizer=float(batch.num_response_tokens)).loss.backward()
            grads[name].append(torch.cat([p.grad.flatten() for p in params]).double())
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    out = {}
    for name in names:
        per_batch = [cos(g, e) for g, e in zip(grads[name], grads["exact"], strict=True)]
        mean_g, mean_e = torch.stack(grads[name]).mean(0), torch.stack(grads["exact"]).mean(0)
        out[name] = {"cos_per_batch_mean": statistics.mean(per_batch), "cos_per_batch_std": statistics.pstdev(per_batch),
                     "cos_of_means": cos(mean_g, mean_e), "norm_ratio": float(mean_g.norm() / mean_e.norm()),
                     "batches": batches}
    return out


def _ms(values: list[float]) -> str:
    """mean +- std (population) of finite values, or '-'."""
    values = [v for v in values if v == v and abs(v) != float("inf")]
    if not values:
        return "-"
    return f"{statistics.mean(values):.3g} +- {statistics.pstdev(values):.2g}" if len(values) > 1 else f"{values[0]:.3g}"


def summarize(rows: list[dict[str, Any]], names: list[str]) -> str:
    """Markdown: per variant, held-out KL / accuracy at the end, the worst training-side numbers over the run."""
    head = ("| variant | held-out KL start -> end | held-out KL max | accuracy end | greedy finished end | "
            "train KL (exact) max | IS ratio max | advantage min | frac A < -5 | sampled finished min |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        runs: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            if r["variant"] == name:
                runs.setdefault(r["seed"], []).append(r)
        if not runs:
            continue
        ev = {s: [r for r in rs if "heldout_kl" in r] for s, rs in runs.items()}
        tr = {s: [r for r in rs if "train_kl_exact" in r] for s, rs in runs.items()}
        col = lambda rs, key, f: [f(r[key] for r in x) for x in rs.values() if x]  # noqa: E731
        start, end = _ms([e[0]["heldout_kl"] for e in ev.values()]), _ms([e[-1]["heldout_kl"] for e in ev.values()])
        lines.append(f"| {name} | {start} -> {end} | {_ms(col(ev, 'heldout_kl', max))} | "
                     f"{_ms([e[-1]['accuracy'] for e in ev.values()])} | {_ms([e[-1]['greedy_finished'] for e in ev.values()])} | "
                     f"{_ms(col(tr, 'train_kl_exact', max))} | {_ms(col(tr, 'ratio_max', max))} | "
                     f"{_ms(col(tr, 'adv_min', min))} | {_ms(col(tr, 'adv_frac_below_-5', statistics.mean))} | "
                     f"{_ms(col(tr, 'finished', min))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.experiment.loss_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path(__file__).resolve().parents[2] / "models" / "task")
    parser.add_argument("--out", type=Path, default=Path("runs/loss_probe"))
    parser.add_argument("--variants", default="sampled-nobaseline,sampled-loo-clip1,topk8,topk32,exact",
                        help=f"comma-separated, from: {', '.join([*VARIANTS, *DEFAULTS])}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps per run (0: no training runs)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--lag", type=int, default=2, help="refresh the sampler's weights every N steps")
    parser.add_argument("--eval-every", type=int, default=30, help="held-out evaluation every N steps (0: none)")
    parser.add_argument("--eval-kl", type=int, default=16, help="held-out prompts for the reverse KL")
    parser.add_argument("--eval-acc", type=int, default=32, help="held-out problems for greedy exact match")
    parser.add_argument("--grad-batches", type=int, default=0, help="also run the gradient probe on N batches")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary-only", action="store_true", help="only rewrite summary.md from --out's steps.jsonl")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS and n not in DEFAULTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {[*VARIANTS, *DEFAULTS]}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    steps_file = args.out / "steps.jsonl"
    if not args.summary_only:
        _train_all(args, names, steps_file)
    # the summary covers every run recorded in the folder (earlier invocations with other variants or seeds too)
    rows = [json.loads(line) for line in steps_file.read_text().splitlines() if line.strip()] if steps_file.exists() else []
    if rows:
        table = summarize(rows, list(dict.fromkeys(r["variant"] for r in rows)))
        (args.out / "summary.md").write_text(table)
        print(table)
    return 0


def _train_all(args: argparse.Namespace, names: list[str], steps_file: Path) -> None:
    """The gradient probe (if asked) and every (seed, variant) run, appended to `steps_file` run by run."""
    env = Env(args.models, eval_kl=args.eval_kl, eval_acc=args.eval_acc)
    t0 = time.monotonic()
    log = lambda m: print(f"[{time.monotonic() - t0:6.0f} s] {m}", flush=True)  # noqa: E731
    if args.grad_batches:
        grads = grad_probe(env, [n for n in names if n != "exact"], args.grad_batches, args.seeds[0])
        (args.out / "grads.json").write_text(json.dumps(grads, indent=2) + "\n")
        log(json.dumps(grads))
    if args.steps == 0:  # the gradient probe alone
        return
    with steps_file.open("a") as fh:
        for seed in args.seeds:
            for name in names:
                fh.writelines(json.dumps(row) + "\n" for row in train_run(env, name, seed, args, log))


if __name__ == "__main__":
    raise SystemExit(main())
