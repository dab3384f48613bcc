"""Scaling on paper: actor and teacher replicas per learner, and where one Redis saturates.

    python bench/bench_pipeline.py --json runs/bench-pipeline.json   # measure the per-stage rates first
    python bench/scaling.py runs/bench-pipeline.json                 # then scale them

WHY on paper: this machine has 2 CPU cores, so the layouts that matter (a learner on its own accelerator,
actors and teachers on theirs) cannot be run here. What can be measured is the cost of each stage per step
(generate, score, train: `bench_pipeline.py`'s single-threaded sync loop, in the same run) and the Redis
write ceiling (redis-benchmark XADD MB/s of a scored-prefix-sized value on the same server). Costs are then
scaled by FLOPs (2 x params per token for generation and teacher scoring, 6 x params per token for a training
step), keeping each stage's measured FLOP rate (CPU rows) or using stated GPU assumptions (GPU rows):

- replicas per learner = time a replica needs to produce one learner step's prefixes / the learner's step time
  (a teacher's cache hits would lower its share; not counted);
- bytes per prefix on Redis: the rollout (prompt + response ids and behaviour logprobs) and the scored prefix
  (plus teacher logprobs and top-k ids and float32 logprobs) are both XADDed, and the learner's commit copies
  the scored payload into its journal: written bytes = rollout + 2 x scored;
- Redis saturates at XADD MB/s / written bytes per prefix prefixes/s; learners per Redis = that / one
  learner's prefixes/s. Past it: a stream per replica group spread over several Redis instances (Redis
  Cluster places each stream key on one node), or fewer bytes (float16 top-k, smaller k).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# GPU assumptions (stated in the output): one H100 SXM, bf16.
PEAK_FLOPS = 989e12
HBM_BYTES_S = 3.35e12
MFU_TRAIN = 0.40  # learner forward + backward
MFU_PREFILL = 0.50  # teacher scoring and prompt prefill
DECODE_BATCH = 64  # concurrent sequences per actor replica (KV-cache bound in practice)
SIZES = [(0.5e9, 7e9), (1.5e9, 32e9), (7e9, 72e9)]  # (student, teacher) params
HORIZONS = [256, 1024, 4096]  # response tokens per prefix (the truncation horizon)
PROMPT = 256


def prefix_bytes(prompt: int, response: int, k: int) -> tuple[int, int]:
    """(rollout, scored) encoded sizes: int32 ids, float32 logprobs, int32 top-k ids, float32 top-k logprobs,
    plus ~0.4 kB of fields (docs/benchmarks.md: 17.75 kB and 550 kB at 256 + 2048 tokens, k=32)."""
    rollout = 4 * (prompt + response) + 4 * response + 400
    return rollout, rollout + response * (4 + 8 * k)


def measured_rates(scenario: dict) -> dict[str, float]:
    """FLOP/s each stage achieved in the 1-thread sync loop (tiny models, this CPU)."""
    st, sh = scenario["stage_seconds_per_step"], scenario["shape"]
    tokens = sh["prompt_tokens_per_step"] + sh["response_tokens_per_step"]
    return {"generate": 2 * sh["student_params"] * tokens / st["generate"],
            "score": 2 * sh["teacher_params"] * tokens / st["score"],
            "train": 6 * sh["student_params"] * tokens / st["train"]}


def step_seconds(n: float, m: float, prompt: int, response: int, rates: dict[str, float] | None) -> dict[str, float]:
    """Seconds per prefix of each stage: on this CPU at the measured FLOP rates, or on a GPU (rates None)."""
    tokens = prompt + response
    if rates is not None:
        return {"generate": 2 * n * tokens / rates["generate"], "score": 2 * m * tokens / rates["score"],
                "train": 6 * n * tokens / rates["train"]}
    decode_tok_s = min(DECODE_BATCH * HBM_BYTES_S / (2 * n), MFU_PREFILL * PEAK_FLOPS / (2 * n))  # bf16 weights
    generate = 2 * n * prompt / (MFU_PREFILL * PEAK_FLOPS) + response / decode_tok_s
    return {"generate": generate, "score": 2 * m * tokens / (MFU_PREFILL * PEAK_FLOPS),
            "train": 6 * n * tokens / (MFU_TRAIN * PEAK_FLOPS)}


def params(n: float) -> str:
    return f"{n / 1e9:g}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def rows(rates: dict[str, float] | None, xadd_mbps: float, k: int, sizes: list[tuple[float, float]],
         shapes: list[tuple[int, int]]) -> list[list[str]]:
    """One row per model pair and (prompt, response) shape."""
    out = []
    for n, m in sizes:
        for prompt, response in shapes:
            s = step_seconds(n, m, prompt, response, rates)
            rollout, scored = prefix_bytes(prompt, response, k)
            written = rollout + 2 * scored
            per_learner = 1.0 / s["train"]  # prefixes/s one busy learner consumes
            saturate = xadd_mbps * 1e6 / written
            out.append([f"{params(n)} / {params(m)}", f"{prompt} + {response}", f"{s['generate'] / s['train']:.2f}",
                        f"{s['score'] / s['train']:.2f}", f"{per_learner:,.1f}", f"{written / 1e3:,.0f}",
                        f"{per_learner * written / 1e6:,.1f}", f"{saturate:,.0f}", f"{saturate / per_learner:,.1f}"])
    return out


def table(title: str, head: list[str], body: list[list[str]]) -> str:
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


HEAD = ["student / teacher", "prompt + horizon (tokens)", "actor replicas per learner", "teacher replicas per learner",
        "prefixes/s per learner", "kB written to Redis per prefix", "MB/s per learner", "prefixes/s where Redis saturates",
        "learners per Redis"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rates", type=Path, help="the --json output of bench/bench_pipeline.py")
    p.add_argument("--scenario", default="demo")
    p.add_argument("--xadd-mbps", type=float, default=None, help="override the measured XADD ceiling (MB/s)")
    p.add_argument("--topk", type=int, default=32, help="teacher top-k for the byte counts (the tiny config uses 8)")
    args = p.parse_args(argv)
    data = json.loads(args.rates.read_text())
    scenario = data["scenarios"][args.scenario]
    xadd = args.xadd_mbps or data.get("xadd_mbps") or 500.0  # 500: a round figure below the quiet-run ceilings
    rates = measured_rates(scenario)
    st, sh = scenario["stage_seconds_per_step"], scenario["shape"]
    print(f"measured (1-thread sync loop, {sh['student_params']:,.0f}-param student, {sh['teacher_params']:,.0f}-param "
          f"teacher, load average {scenario['stage_load'][0]:.1f}): generate {st['generate']:.3f} s, score "
          f"{st['score']:.3f} s, train {st['train']:.3f} s per step of {sh['prefixes_per_step']:.0f} prefixes; "
          f"achieved GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in rates.items()))
    print(f"tiny models as measured: {st['generate'] / st['train']:.2f} actor and {st['score'] / st['train']:.2f} "
          f"teacher replicas per learner; Redis XADD ceiling {xadd:,.0f} MB/s"
          + (" (given)" if args.xadd_mbps else " (measured)" if data.get("xadd_mbps") else " (assumed: not measured)"))
    tiny = [(float(sh["student_params"]), float(sh["teacher_params"]))]
    b = sh["prefixes_per_step"]
    measured_shape = (round(sh["prompt_tokens_per_step"] / b), round(sh["response_tokens_per_step"] / b))
    print()
    print(table(f"This CPU, 1 thread per replica (measured per-stage FLOP rates), top-k {args.topk}; the tiny models "
                "at the measured shape, then longer horizons", HEAD,
                rows(rates, xadd, args.topk, tiny, [measured_shape] + [(PROMPT, h) for h in HORIZONS])))
    print()
    print(table(f"GPU host on paper (replicas in H100s per learner GPU; bf16, train MFU {MFU_TRAIN}, prefill MFU "
                f"{MFU_PREFILL}, decode {DECODE_BATCH} sequences per replica bounded by {HBM_BYTES_S / 1e12:g} TB/s HBM), "
                f"top-k {args.topk}", HEAD, rows(None, xadd, args.topk, SIZES, [(PROMPT, h) for h in HORIZONS])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
