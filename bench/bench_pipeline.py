"""Pipeline benchmark: the asynchronous pipeline (`opd up`) against a synchronous generate-score-train loop.

    python bench/bench_pipeline.py                                  # tiny models, ~2-3 minutes on 2 CPU cores
    python bench/bench_pipeline.py --steps 60 --append docs/benchmarks.md

WHY this comparison: the point of the actor -> teacher -> learner split is that the learner never waits
for generation and scoring, so it trains more tokens per second of wall time than a loop that generates,
scores and trains in turn. Both sides run in the same invocation, on the same machine, with the same
tiny student and teacher, the same truncation schedule, batch size, loss and learning rate
(`configs/tiny-cpu.yaml`); the synchronous loop is the baseline (ratio = async / sync).

What is measured, over the steps after a warm-up (startup, process spawn and model loads excluded):
- learner tokens/s: response tokens trained per second of wall time (end to end: includes waiting);
- learner idle fraction: the part of that wall time the learner spent waiting for data. In the async
  pipeline this is the per-step `waited_s` the learner writes to `history.jsonl`; in the sync loop the
  learner is idle while the batch is generated and scored;
- other fraction: the rest of the learner's wall time (publishing weights, committing the batch,
  bookkeeping; in the sync loop, copying the weights into the engine);
- step compute tokens/s: response tokens per second of the optimizer step alone (how fast the learner
  trains when it trains: it shows CPU contention between the async roles).

The async pipeline runs as `opd up` (2 actors, 1 teacher with its Zarr cache, 1 learner, a private
redis-server, each role a single-threaded process). The sync loop uses the same components in this
process: `actors.engines.hf.HFRolloutEngine`, `cache.scorers.hf.HFTeacherScorer` (no cache) and the learner's
batching and loss (`learner.batching`, `learner.losses`), on all cores, and copies the new weights into
the engine in memory after each step (staleness 0; the async actors reload published weights from disk).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engines.hf import HFRolloutEngine
from actors.prompts import load_prompts
from cache.scorers.hf import HFTeacherScorer
from learner.batching import Sample, collate, pack_by_tokens
from learner.losses import Loss
from opd.config import OPDConfig, load_config
from opd.tiny import asset_paths, build_tiny_assets
from protocol.state import LearnerState

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
SECTION = "## Pipeline: asynchronous vs synchronous (`bench/bench_pipeline.py`)"


@dataclass
class Result:
    name: str
    steps: int  # steps in the measured window
    tokens: int  # response tokens trained in the window
    wall_s: float  # wall time of the window
    waited_s: float  # learner idle time in the window
    compute_s: float  # optimizer-step time in the window
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.wall_s, 1e-9)

    @property
    def idle_fraction(self) -> float:
        return self.waited_s / max(self.wall_s, 1e-9)

    @property
    def other_fraction(self) -> float:
        """Wall time neither waiting nor in the optimizer step: publishing, committing, bookkeeping."""
        return max(0.0, 1.0 - self.idle_fraction - self.compute_s / max(self.wall_s, 1e-9))

    @property
    def compute_tokens_per_s(self) -> float:
        return self.tokens / max(self.compute_s, 1e-9)


def window(rows: list[dict[str, float]], warmup: int, steps: int) -> tuple[list[dict[str, float]], float]:
    """Steps ``warmup + 1 .. steps`` and the wall time they span (from the end of step ``warmup``).

    Steps past ``steps`` are the async learner's drain (training what was still in flight, then waiting
    for the books to close): not the steady state, so left out.
    """
    rows = sorted((r for r in rows if r["step"] <= steps), key=lambda r: r["step"])
    measured = rows[warmup:]
    return measured, rows[-1]["time"] - rows[warmup - 1]["time"]


# ---------------------------------------------------------------------------------------------
# the asynchronous pipeline (`opd up`)
# ---------------------------------------------------------------------------------------------


def run_async(cfg_overrides: list[str], steps: int, warmup: int, work: Path) -> Result:
    cmd = [sys.executable, "-m", "opd.cli", "up", "--config", str(CONFIG), "--steps", str(steps), "--no-progress"]
    for o in cfg_overrides:
        cmd += ["--set", o]
    log_path = work / "opd-up.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=600).returncode
    total_s = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"opd up failed ({code}); see {log_path}:\n{log_path.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (work / "learner" / "history.jsonl").read_text().splitlines() if line.strip()]
    measured, wall = window(rows, warmup, steps)
    learner_log = (work / "logs" / "learner-0.log").read_text(errors="replace")
    dropped = next((line.split("dropped ", 1)[1].strip() for line in learner_log.splitlines() if "learner done" in line), "?")
    return Result("async `opd up` (2 actors, 1 teacher + cache, 1 learner; 1 thread each)", len(measured),
                  sum(int(r["tokens"]) for r in measured), wall, sum(float(r["waited_s"]) for r in measured),
                  sum(float(r["seconds"]) for r in measured),
                  note=f"whole `opd up` incl. startup and drain: {total_s:.0f}s; dropped as stale: {dropped}")


# ---------------------------------------------------------------------------------------------
# the synchronous baseline: generate, score, train, in turn, in this process
# ---------------------------------------------------------------------------------------------


def run_sync(cfg: OPDConfig, steps: int, warmup: int, *, threads: int) -> Result:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.learner.seed)
    a, t, lc = cfg.actor, cfg.teacher, cfg.learner
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    prompts = load_prompts(a.prompts_file, tokenizer, use_chat_template=a.use_chat_template)
    engine = HFRolloutEngine(a.model_dir)
    scorer = HFTeacherScorer(t.model_dir)
    student = AutoModelForCausalLM.from_pretrained(lc.model_dir, dtype=torch.float32, use_safetensors=True)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
    schedule = a.schedule.build(a.max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(lc.seed)
    rows: list[dict[str, float]] = []
    for step in range(steps):
        t0 = time.perf_counter()
        idx = [rng.randrange(len(prompts)) for _ in range(lc.batch_size)]
        horizons = [schedule.horizon(LearnerState.assumed(step), rng) for _ in idx]  # on-policy: version == step
        gens = engine.generate([prompts[i] for i in idx], horizons, temperature=a.temperature, top_p=a.top_p,
                               seed=rng.randrange(2**31))
        sequences = [torch.tensor(prompts[i] + g.response_ids, dtype=torch.int32).numpy() for i, g in zip(idx, gens, strict=True)]
        scores = scorer.score(sequences, [len(prompts[i]) for i in idx], k=t.topk)
        t1 = time.perf_counter()
        samples = [Sample(prompt_ids=sequences[j][:len(prompts[i])], response_ids=sequences[j][len(prompts[i]):],
                          behaviour_logprobs=torch.tensor(g.logprobs, dtype=torch.float32).clamp(max=0).numpy(),
                          teacher_logprobs=s.logprobs_R, topk_ids=s.topk_ids_RK, topk_logprobs=s.topk_logprobs_RK,
                          policy_version=step)
                   for j, (i, g, s) in enumerate(zip(idx, gens, scores, strict=True))]
        tokens = train_step(student, optimizer, samples, pad_id, lc.micro_batch_tokens, lc.loss.build(), lc.grad_clip)
        engine.model.load_state_dict(student.state_dict())  # on-policy: the next batch samples the new weights
        t2 = time.perf_counter()
        rows.append({"step": step + 1, "tokens": tokens, "waited_s": t1 - t0, "seconds": t2 - t1, "time": time.time()})
    measured, wall = window(rows, warmup, steps)
    return Result(f"sync, {threads} thread{'s' if threads > 1 else ''} (generate -> score -> train)", len(measured),
                  sum(int(r["tokens"]) for r in measured), wall, sum(r["waited_s"] for r in measured),
                  sum(r["seconds"] for r in measured))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, samples: list[Sample], pad_id: int,
               micro_batch_tokens: int, loss: Loss, grad_clip: float) -> int:
    """The learner's step (`learner.step.Trainer.step`, single process, the configured `learner.loss`)."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    total = sum(len(s.response_ids) for s in samples)
    optimizer.zero_grad(set_to_none=True)
    for group in pack_by_tokens(lengths, micro_batch_tokens):
        batch = collate([samples[i] for i in group], pad_id)
        logits_BTV = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        out = loss(batch, logits_BTV, weights_BT=None, normalizer=float(max(total, 1)))
        out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return total


# ---------------------------------------------------------------------------------------------


# Scenarios: (name, extra overrides on top of configs/tiny-cpu.yaml). "demo" is that config as shipped (the
# demo's before it moved to the task models; docs/benchmarks.md's earlier runs name it configs/demo-cpu.yaml);
# "long" makes each step heavier (4x the tokens per step) so the fixed per-step cost of the async
# pipeline (publish to disk, actors reload, Redis hops) weighs less against generation and training.
SCENARIOS: dict[str, list[str]] = {
    "demo": [],
    "long": ["actor.max_new_tokens=64", "learner.batch_size=32", "actor.schedule={kind: full}"],
}


def table(rows: list[tuple[str, list[Result]]]) -> str:
    """One line per run; ratios against the scenario's first run (the sync loop on every core)."""
    lines = ["| scenario | run | steps measured | learner tokens/s (wall) | vs sync | learner idle fraction | "
             "other fraction | step compute tokens/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for scenario, results in rows:
        sync = results[0]
        for r in results:
            lines.append(f"| {scenario} | {r.name} | {r.steps} | {r.tokens_per_s:,.0f} | "
                         f"{r.tokens_per_s / sync.tokens_per_s:.2f}x | {r.idle_fraction:.2f} | {r.other_fraction:.2f} | "
                         f"{r.compute_tokens_per_s:,.0f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="learner steps of each run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the measurement")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {sorted(SCENARIOS)}")
    parser.add_argument("--work", type=Path, default=None, help="work dir (default: a temp dir, removed)")
    parser.add_argument("--append", type=Path, default=None, help="add the results under this benchmark's section of this markdown file")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps <= args.warmup + 1:
        parser.error("need 1 <= --warmup < --steps - 1")
    scenarios = [x for x in args.scenarios.split(",") if x]
    if unknown := sorted(set(scenarios) - set(SCENARIOS)):
        parser.error(f"unknown scenarios {unknown}")
    rows: list[tuple[str, list[Result]]] = []
    cores = os.cpu_count() or 1
    notes: list[str] = []
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pipeline-")))
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        build_tiny_assets(work / "assets", seed=0)
        paths = asset_paths(work / "assets")
        print(f"tiny models ready in {time.perf_counter() - t0:.0f}s", flush=True)
        for scenario in scenarios:
            run_dir = work / scenario
            overrides = [
                f"run.workdir={run_dir}", "run.tiny_assets=null", "run.warm_cache=null", f"actor.model_dir={paths.student_dir}",
                f"actor.prompts_file={paths.prompts_file}", f"teacher.model_dir={paths.teacher_dir}",
                f"teacher.cache_dir={run_dir / 'cache'}", f"learner.model_dir={paths.student_dir}",
                f"learner.workdir={run_dir / 'learner'}", "learner.eval.heldout_file=",
                f"learner.checkpoint_every={args.steps}", *SCENARIOS[scenario],
            ]
            cfg = load_config(CONFIG, overrides)
            t0 = time.perf_counter()
            syncs = [run_sync(cfg, args.steps, args.warmup, threads=n) for n in sorted({cores, 1}, reverse=True)]
            print(f"{scenario}: sync loops {time.perf_counter() - t0:.0f}s", flush=True)
            t0 = time.perf_counter()
            run_dir.mkdir(parents=True, exist_ok=True)
            asynchronous = run_async(overrides, args.steps, args.warmup, run_dir)
            print(f"{scenario}: async pipeline {time.perf_counter() - t0:.0f}s", flush=True)
            rows.append((scenario, [*syncs, asynchronous]))
            notes.append(f"- {scenario}: batch {cfg.learner.batch_size}, max_new_tokens {cfg.actor.max_new_tokens}, "
                         f"{cfg.actor.schedule.kind} truncation; async: {asynchronous.note}")

    command = shlex.join(["python", "bench/bench_pipeline.py", *sys.argv[1:]])
    section = "\n".join([
        f"### Pipeline: async vs sync ({time.strftime('%Y-%m-%d')})", "",
        f"Command: `{command}` on {machine()}, {time.perf_counter() - started:.0f}s in all. "
        f"`configs/tiny-cpu.yaml` ({cfg.learner.loss.kind}, lr {cfg.learner.lr}); {args.steps} steps per run, "
        f"the first {args.warmup} left out.", "",
        table(rows), "", *notes, "",
    ])
    print()
    print(section)
    if args.append:
        append_under_section(args.append, section)
        print(f"appended to {args.append}")
    return 0


def append_under_section(path: Path, block: str) -> None:
    """Add ``block`` at the end of this benchmark's section of ``path`` (other sections stay as they are).

    Why not at the end of the file: the file holds every benchmark's section, each with its own history
    of results, so a new result belongs after the last one of its own section.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start == -1:
        path.write_text(text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}")
        return
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end == -1 else end + 1
    head, tail = text[:end].rstrip("\n"), text[end:]
    path.write_text(f"{head}\n\n{block}" + (f"\n{tail}" if tail else ""))


if __name__ == "__main__":
    sys.exit(main())
