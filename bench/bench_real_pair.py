"""The earlier benchmarks, re-measured on a real pretrained pair at a real vocabulary (issue 15).

    python bench/bench_real_pair.py                          # models/smollm2 (`opd models smollm2 --out models/smollm2`)
    python bench/bench_real_pair.py --pair DIR --json runs/bench-real-pair.json
    python bench/bench_real_pair.py --quick --pair DIR       # a minutes-long smoke run (tests/integration)
    python bench/bench_real_pair.py --parts 5 --seeds 2      # some parts only (numbered below), another seed
    python bench/bench_real_pair.py --from-json FILE         # print an earlier --json run's tables again

WHY: every figure published before (cache bytes/token, learner tokens/s, async vs sync) was measured on
character-level models with 18-70 token vocabularies, or on synthetic Zipfian teacher outputs. A user's pair
has a 49,152-token BPE vocabulary, a chat template and an end-of-turn token: the teacher's real top-k
distributions decide how well the cache compresses, the vocabulary decides the learner's memory. On the
SmolLM2-135M-Instruct teacher and its 8-layer pruned student (`opd models smollm2`), in one run, each with
its baseline measured in the same run (the machine is shared: ratios, not absolute times, carry over):

1. cache bytes/token at each k on real teacher scores (the HF scorer the teacher runs, stored in a real Zarr
   cache opened as the teacher opens it), of the student's samples and of the teacher's greedy answers, beside
   synthetic Zipfian outputs of the same size (bench/bench_cache.py's model), against the uncompressed payload;
2. a cache warmed with the teacher's own answers (`opd.models.write_teacher_answers`, k=8): hit rate, teacher
   tokens forwarded and FLOPs saved when the teacher re-scores the answers (a student that reproduces them)
   and the student's samples, through `cache.scoring.score_with_cache`; the baseline is scoring without cache;
3. actor (HF engine generate), teacher (HF scorer) and learner (`learner.step.Trainer`, one step) tokens/s and
   peak RSS, each role in its own spawned process; the learner also at `learner.max_logits_mb` 256 / 1024 /
   unbounded with the same batch, showing the vocabulary-aware micro-batch cap bounds its memory;
4. async (`opd up`) vs a synchronous loop on the pair: `bench/bench_pipeline.py --pair` in a subprocess;
5. which `teacher.topk` to default to: the same synchronous steps from the same student at each k (same
   prompts and generation seed per step), then the full-vocabulary held-out reverse KL.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
GOAL_K, GOAL_BYTES = 32, 150  # issue 15: at most 150 B/token at k=32
UNBOUNDED_MB = 1 << 20


def md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def bytes_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        p = r["parts"]
        goal = ("met" if r["marginal"] <= GOAL_BYTES else "MISSED") if r["k"] == GOAL_K else ""
        out.append([r["source"], str(r["k"]), r["dtype"], str(r["payload"]), f"{r['bytes_per_token']:.1f}",
                    f"{r['marginal']:.1f}", f"{r['marginal'] / r['payload']:.2f}x", f"{p['logprobs']:.1f}", f"{p['topk_ids']:.1f}",
                    f"{p['topk_logprobs']:.1f}", f"{p['records+meta']:.1f}", str(r["stored_tokens"]), goal])
    return md_table(["source", "k", "top-k dtype", "payload B/tok", "disk B/tok (whole store)", "marginal B/tok",
                     "marginal/payload", "logprobs", "top-k ids", "top-k logprobs", "records+meta", "tokens",
                     f"marginal <= {GOAL_BYTES} at k={GOAL_K}"], out)


def hits_table(rows: list[dict[str, Any]]) -> str:
    return md_table(["re-scored", "sequences (full hits)", "tokens", "token hit rate", "answer hit rate",
                     "tokens forwarded", "teacher GFLOPs", "FLOPs saved", "seconds vs no cache"],
                    [[r["source"], f"{r['sequences']} ({r['full_hits']})", str(r["tokens"]), f"{r['hit_rate']:.2f}",
                      f"{r['response_hit_rate']:.2f}", str(r["tokens_forwarded"]), f"{r['teacher_gflops']:.1f}",
                      f"{r['flops_saved']:.2f}", f"{r['seconds']:.2f}s vs {r['no_cache_seconds']:.2f}s "
                      f"({r['seconds'] / max(r['no_cache_seconds'], 1e-9):.2g}x)"] for r in rows])


def roles_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        what = {"actor": "generated", "teacher": "scored", "learner": "trained (response)"}[r["role"]]
        cap = ""
        if r["role"] == "learner":
            mb = r["max_logits_mb"]
            cap = f"max_logits_mb {'unbounded' if mb >= UNBOUNDED_MB else mb}: {r['micro_batch_tokens']} tok/micro-batch"
        out.append([r["role"], cap, f"{r['tokens']} {what}", f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}",
                    f"{r['rss_loaded_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                    f"{r['peak_rss_mb'] - r['rss_loaded_mb']:.0f}", f"{r['process_peak_rss_mb']:.0f}"])
    return md_table(["role", "setting", "tokens", "seconds", "tokens/s", "RSS loaded MB", "peak RSS of the work MB",
                     "work peak - loaded MB", "process peak RSS MB (loading included)"], out)


def topk_table(runs: list[Any], start_kl: float, bytes_by_k: dict[int, float]) -> str:
    ks = sorted({r.k for r in runs})
    out = []
    for k in ks:
        mine = [r for r in runs if r.k == k]
        kls = [r.heldout_kl for r in mine]
        spread = f" (seeds {', '.join(f'{x:.3f}' for x in kls)})" if len(kls) > 1 else ""
        out.append([str(k), f"{start_kl:.3f}", f"{sum(kls) / len(kls):.3f}{spread}",
                    f"{sum(kls) / len(kls) / start_kl:.2f}x",
                    " / ".join(f"{x:.2f}" for x in mine[0].train_reverse_kl),
                    f"{bytes_by_k.get(k, float('nan')):.1f}", f"{sum(r.seconds for r in mine) / len(mine):.0f}"])
    return md_table(["teacher.topk", "held-out KL at step 0", "held-out KL after", "after / start",
                     "training-prefix reverse KL per step (first seed)", "cache B/tok (part 1: float32, student samples, whole store)",
                     "seconds per run"], out)


def run_pipeline(pair: Path, args: argparse.Namespace, work: Path) -> str:
    """`bench/bench_pipeline.py --pair` (async `opd up` vs the sync loop) in a subprocess; its table."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_pipeline.py"), "--pair", str(pair), "--steps",
           str(args.pipeline_steps), "--warmup", "2", "--layouts", "1x1", "--sync-threads", str(args.threads),
           "--no-profile", "--work", str(work / "pipeline")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0:
        return f"(bench_pipeline.py --pair failed, exit {proc.returncode}: {proc.stderr[-1500:]})"
    return proc.stdout[proc.stdout.find("| scenario"):].strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", type=Path, default=REPO / "models" / "smollm2", help="dir with teacher/ and student/")
    p.add_argument("--prompts", type=Path, default=REPO / "models" / "smollm2" / "prompts.jsonl")
    p.add_argument("--heldout", type=Path, default=REPO / "models" / "smollm2" / "heldout.jsonl")
    p.add_argument("--samples", type=int, default=8, help="prompts the shared samples and answers come from")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per sample / teacher answer")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128], help="teacher.topk values compared")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"], help="top-k dtypes sized on disk")
    p.add_argument("--block-size", type=int, default=32, help="teacher.block_size (configs/smollm2-cpu.yaml)")
    p.add_argument("--role-batch", type=int, default=4, help="actor prompts per generate")
    p.add_argument("--role-tokens", type=int, default=32, help="actor new tokens per prompt")
    p.add_argument("--learner-repeat", type=int, default=2, help="the samples, this many times, make the learner batch")
    p.add_argument("--logits-mb", type=int, nargs="+", default=[256, 1024, UNBOUNDED_MB])
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-tokens", type=int, default=48, help="new tokens per sample, and per held-out answer")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--pipeline-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) of every process")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="which measurements (numbered above)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, no pipeline part (smoke test)")
    p.add_argument("--from-json", type=Path, default=None, help="print the tables of an earlier --json run; measure nothing")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(report(saved["results"], argparse.Namespace(**saved["args"])))
        return 0
    if args.quick:
        args.samples, args.new_tokens, args.ks, args.role_batch, args.role_tokens = 2, 8, [8, 32], 2, 4
        args.learner_repeat, args.logits_mb = 1, [256, UNBOUNDED_MB]
        args.parts = [x for x in args.parts if x != 4]
        args.train_steps, args.train_batch, args.train_tokens, args.eval_prompts = 1, 2, 8, 2
    for name in ("teacher", "student"):
        if not (args.pair / name / "config.json").is_file():
            p.error(f"--pair {args.pair}: no {name}/config.json (build it: opd models smollm2 --out {args.pair})")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads; spawned roles inherit it
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-real-pair-") as tmp_s:
        results = measure(args, Path(tmp_s))
    results["elapsed_s"], results["load"] = time.perf_counter() - started, [load0, os.getloadavg()[0]]
    results["command"] = shlex.join(["python", "bench/bench_real_pair.py", *(sys.argv[1:] if argv is None else argv)])
    if args.json:  # first: a report that fails still leaves the figures
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    print(report(results, args))
    return 0


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from bench import real_pair_parts as parts
    from cache.scorers.hf import HFTeacherScorer
    from protocol.prompts import PromptFormat, load_prompts

    torch.set_num_threads(args.threads)
    pair, out = args.pair, {}
    scorer = HFTeacherScorer(pair / "teacher")
    log = lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if {1, 2, 3} & set(args.parts):
        out |= samples_parts(args, tmp, scorer, log)
    if 4 in args.parts:
        log("4. async vs sync (bench_pipeline.py --pair)")
        out["pipeline"] = run_pipeline(pair, args, tmp)
    if 5 not in args.parts:
        return out
    log("5. teacher.topk")
    tok = AutoTokenizer.from_pretrained(pair / "student")
    fmt = PromptFormat(use_chat_template=True)
    prompts = load_prompts(args.prompts, tok, fmt)
    heldout = load_prompts(args.heldout, tok, fmt, limit=args.eval_prompts)
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(pair / "student", dtype=torch.float32, use_safetensors=True)
    out["start_kl"] = parts.heldout_kl(start, scorer.model, heldout, args.train_tokens)
    del start
    runs = [parts.train_topk(pair, scorer, prompts, heldout, k=k, seed=seed, steps=args.train_steps,
                             batch=args.train_batch, new_tokens=args.train_tokens, lr=args.lr,
                             eval_tokens=args.train_tokens) for seed in args.seeds for k in args.ks]
    out["topk"] = [vars(r) for r in runs]
    return out


def samples_parts(args: argparse.Namespace, tmp: Path, scorer: Any, log: Any) -> dict[str, Any]:
    """Parts 1-3, on the shared samples: bytes per token, the warmed cache, the roles."""
    from bench import real_pair_parts as parts
    from bench.common import redis_server

    pair, out = args.pair, {}
    log("samples: the student's, the teacher's greedy answers")
    samples = parts.make_samples(pair, args.prompts, args.samples, args.new_tokens, tmp)
    kmax = max(args.ks)
    full, baseline = {}, {}
    for source, seqs in (("student samples", samples.student), ("teacher answers", samples.teacher)):
        full[source], baseline[source] = parts.score_full(scorer, seqs, kmax)
    with redis_server(None, tmp) as url:
        log("1. bytes per token")
        out["bytes"] = parts.bytes_rows(tmp, url, scorer.identity, samples, full, args.ks, args.dtypes, args.block_size)
        log("2. warmed cache")
        warm_root = tmp / f"bytes-teacher-k{min(args.ks)}-float32"
        out["hits"] = parts.warm_hits(scorer, warm_root, url, min(args.ks), args.block_size, samples, baseline)
    log("3. roles")
    seqs, starts = samples.student, [len(x) for x in samples.prompts]
    roles = [parts.run_role("actor", pair, {"prompts": samples.prompts[:args.role_batch], "new_tokens": args.role_tokens},
                            args.threads),
             parts.run_role("teacher", pair, {"seqs": seqs, "starts": starts, "k": min(args.ks)}, args.threads)]
    messages = parts.scored_messages(samples, full["student samples"], min(args.ks), args.learner_repeat)
    for mb in args.logits_mb:
        roles.append(parts.run_role("learner", pair, {"messages": messages, "micro_batch_tokens": 1 << 16,
                                                      "max_logits_mb": mb}, args.threads))
    out["roles"] = roles
    return out


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    from bench.real_pair_parts import TopKRun

    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), "?")
    import torch

    bytes_by_k = {r["k"]: r["bytes_per_token"] for r in res.get("bytes", [])
                  if r["source"] == "student samples" and r["dtype"] == "float32"}
    parts = [
        f"Command: `{res['command']}` on {os.cpu_count()} cores "
        f"({cpu}), torch {torch.__version__}, {args.threads} torch thread(s) per process (OMP_NUM_THREADS="
        f"{args.threads}), {res['elapsed_s']:.0f}s in all; "
        f"1-minute load average {res['load'][0]:.1f} at the start, {res['load'][1]:.1f} at the end (the machine is shared).",
    ]
    if "bytes" in res:
        parts += ["", f"1. cache bytes per token ({args.samples} prompts, {args.new_tokens} new tokens, block "
                  f"{args.block_size})", "", bytes_table(res["bytes"]), "",
                  f"2. cache warmed with the teacher's greedy answers (k={min(args.ks)}), then re-scored", "",
                  hits_table(res["hits"]), "", "3. each role in its own process", "", roles_table(res["roles"]), ""]
    if "pipeline" in res:
        parts += ["4. async vs sync on the pair (bench/bench_pipeline.py --pair)", "", res["pipeline"], ""]
    if "topk" not in res:
        return "\n".join(parts)
    runs = [TopKRun(**r) for r in res["topk"]]
    parts += [f"5. teacher.topk: {args.train_steps} synchronous steps (batch {args.train_batch}, {args.train_tokens} "
              f"new tokens, lr {args.lr}, seeds {args.seeds}), held-out full-vocabulary reverse KL on "
              f"{args.eval_prompts} prompts ({args.train_tokens} tokens)", "",
              topk_table(runs, res["start_kl"], bytes_by_k), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
