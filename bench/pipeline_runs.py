"""The two sides of bench/bench_pipeline.py: one `opd up` run per layout, and the synchronous loop.

Both produce a `Result` over the same window: the steps after `warmup`, up to `steps` (an async learner's
drain, training what is still in flight, is not the steady state).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
import torch

from actors.engines.hf import HFRolloutEngine
from actors.prompts import load_prompts
from bench import spy
from cache.scorers.hf import HFTeacherScorer
from learner.batching import Sample, collate, pack_by_tokens
from learner.losses import Loss
from opd.config import OPDConfig
from protocol.state import LearnerState


@dataclass
class Result:
    name: str
    kind: str  # "sync" | "async"
    label: str  # "sync 1 thread" | the layout ("2x1")
    steps: int  # steps in the measured window
    tokens: int  # response tokens trained in the window
    wall_s: float
    waited_s: float  # learner idle time in the window
    compute_s: float  # optimizer-step time in the window
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and the end
    threads: int = 1
    note: str = ""
    stages: dict[str, float] = field(default_factory=dict)  # sync: seconds per step of generate / score / train
    shape: dict[str, float] = field(default_factory=dict)  # sync: params, tokens per step (what scaling.py scales)
    redis_calls_per_step: float | None = None  # commands, those inside scripts and transactions included
    redis_reads_per_step: float | None = None  # request reads by the server: ~round trips (a pipeline is one)
    redis_top: dict[str, float] = field(default_factory=dict)  # command -> calls per step
    profiles: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> spy.breakdown

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.wall_s, 1e-9)

    @property
    def idle_fraction(self) -> float:
        return self.waited_s / max(self.wall_s, 1e-9)

    @property
    def other_fraction(self) -> float:
        return max(0.0, 1.0 - self.idle_fraction - self.compute_s / max(self.wall_s, 1e-9))

    @property
    def compute_tokens_per_s(self) -> float:
        return self.tokens / max(self.compute_s, 1e-9)


def loadavg() -> float:
    return os.getloadavg()[0]


def window(rows: list[dict[str, float]], warmup: int, steps: int) -> tuple[list[dict[str, float]], float]:
    """Steps ``warmup + 1 .. steps`` and the wall time they span (from the end of step ``warmup``)."""
    rows = sorted((r for r in rows if r["step"] <= steps), key=lambda r: r["step"])
    return rows[warmup:], rows[-1]["time"] - rows[warmup - 1]["time"]


# ---------------------------------------------------------------------------------------------
# the asynchronous pipeline (`opd up`), one layout
# ---------------------------------------------------------------------------------------------


def _history_rows(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _role_pid(config: Path, role: str) -> int | None:
    out = subprocess.run(["pgrep", "-f", f"opd.cli {role} --config {config} --index 0"], capture_output=True, text=True)
    pids = [int(x) for x in out.stdout.split()]
    return pids[0] if pids else None


def _watch(proc: subprocess.Popen[bytes], run_dir: Path, warmup: int, steps: int, profile: bool
           ) -> dict[str, dict[str, float]]:
    """Wait for `opd up`; with `profile`, py-spy the learner, actor-0 and teacher-0 over the measured window."""
    history, config = run_dir / "learner" / "history.jsonl", run_dir / "config.yaml"
    recorders: dict[str, spy.Recorder] = {}
    deadline = time.monotonic() + 900
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"opd up in {run_dir} did not finish within 900 s")
        n = _history_rows(history)
        if profile and not recorders and n >= warmup:
            for role in ("learner", "actor", "teacher"):
                pid = _role_pid(config, role)
                rec = spy.Recorder(pid, run_dir / f"spy-{role}.txt").start() if pid else None
                if rec is not None:
                    recorders[role] = rec
        if recorders and n >= steps:
            break
        time.sleep(0.1)
    raws = {role: rec.stop() for role, rec in recorders.items()}
    proc.wait(timeout=900)
    cats = {"learner": (spy.LEARNER, "Learner.run"), "actor": (spy.ACTOR, "Actor.run"),
            "teacher": (spy.TEACHER, "Teacher.run")}
    return {role: spy.breakdown(raw, *cats[role]) for role, raw in raws.items()}


def run_async(overrides: list[str], steps: int, warmup: int, run_dir: Path, url: str, *, label: str, profile: bool,
              repo: Path, config: Path) -> Result:
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.config_resetstat()
    cmd = [sys.executable, "-m", "opd.cli", "up", "--config", str(config), "--steps", str(steps), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path, load0, t0 = run_dir / "opd-up.log", loadavg(), time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
        try:
            profiles = _watch(proc, run_dir, warmup, steps, profile)
        finally:
            if proc.poll() is None:
                proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"opd up failed ({proc.returncode}); see {log_path}:\n{log_path.read_text()[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "learner" / "history.jsonl").read_text().splitlines() if x.strip()]
    measured, wall = window(rows, warmup, steps)
    stats = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()}
    for admin in ("flushdb", "config|resetstat", "config", "info"):
        stats.pop(admin, None)
    per_step = {k: v / max(len(rows), 1) for k, v in sorted(stats.items(), key=lambda kv: -kv[1])}
    reads = int(client.info("stats").get("total_reads_processed", 0)) / max(len(rows), 1)
    learner_log = (run_dir / "logs" / "learner-0.log").read_text(errors="replace")
    dropped = next((x.split("dropped ", 1)[1].strip() for x in learner_log.splitlines() if "learner done" in x), "?")
    actors, teachers = label.split("b")[0].split("x")
    return Result(
        f"async {label} ({actors} actor(s), {teachers} teacher(s) + cache, 1 learner)", "async", label, len(measured),
        sum(int(r["tokens"]) for r in measured), wall, sum(float(r["waited_s"]) for r in measured),
        sum(float(r["seconds"]) for r in measured), load=(load0, loadavg()),
        note=f"whole `opd up` {time.perf_counter() - t0:.0f}s; dropped as stale: {dropped}",
        redis_calls_per_step=sum(per_step.values()), redis_reads_per_step=reads, redis_top=dict(list(per_step.items())[:6]),
        profiles=profiles)


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
    engine, scorer = HFRolloutEngine(a.model_dir), HFTeacherScorer(t.model_dir)
    student = AutoModelForCausalLM.from_pretrained(lc.model_dir, dtype=torch.float32, use_safetensors=True)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
    schedule, loss = a.schedule.build(a.max_new_tokens), lc.loss.build()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(lc.seed)
    rows: list[dict[str, float]] = []
    load0 = loadavg()
    for step in range(steps):
        t0 = time.perf_counter()
        idx = [rng.randrange(len(prompts)) for _ in range(lc.batch_size)]
        horizons = [schedule.horizon(LearnerState.assumed(step), rng) for _ in idx]  # on-policy: version == step
        gens = engine.generate([prompts[i] for i in idx], horizons, temperature=a.temperature, top_p=a.top_p,
                               seed=rng.randrange(2**31))
        seqs = [np.asarray(prompts[i] + g.response_ids, dtype=np.int32) for i, g in zip(idx, gens, strict=True)]
        t_gen = time.perf_counter()
        scores = scorer.score(seqs, [len(prompts[i]) for i in idx], k=t.topk)
        t1 = time.perf_counter()
        samples = [Sample(prompt_ids=seqs[j][:len(prompts[i])], response_ids=seqs[j][len(prompts[i]):],
                          behaviour_logprobs=np.minimum(np.asarray(g.logprobs, dtype=np.float32), 0.0),
                          teacher_logprobs=s.logprobs_R, topk_ids=s.topk_ids_RK, topk_logprobs=s.topk_logprobs_RK,
                          policy_version=step)
                   for j, (i, g, s) in enumerate(zip(idx, gens, scores, strict=True))]
        tokens = train_step(student, optimizer, samples, pad_id, lc.micro_batch_tokens, loss, lc.grad_clip)
        engine.model.load_state_dict(student.state_dict())  # on-policy: the next batch samples the new weights
        t2 = time.perf_counter()
        rows.append({"step": step + 1, "tokens": tokens, "waited_s": t1 - t0, "seconds": t2 - t1, "time": time.time(),
                     "generate": t_gen - t0, "score": t1 - t_gen, "prompt": sum(len(prompts[i]) for i in idx)})
    measured, wall = window(rows, warmup, steps)
    n = max(len(measured), 1)
    stages = {"generate": sum(r["generate"] for r in measured) / n, "score": sum(r["score"] for r in measured) / n,
              "train": sum(r["seconds"] for r in measured) / n}
    shape = {"student_params": engine.num_parameters(), "teacher_params": scorer.num_parameters(), "topk": t.topk,
             "prefixes_per_step": lc.batch_size, "prompt_tokens_per_step": sum(r["prompt"] for r in measured) / n,
             "response_tokens_per_step": sum(r["tokens"] for r in measured) / n}
    label = f"sync {threads} thread{'s' if threads > 1 else ''}"
    return Result(f"{label} (generate -> score -> train)", "sync", label, len(measured),
                  sum(int(r["tokens"]) for r in measured), wall, sum(r["waited_s"] for r in measured),
                  sum(r["seconds"] for r in measured), load=(load0, loadavg()), threads=threads, stages=stages, shape=shape)


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


def xadd_ceiling_mbps(url: str, tmp: Path) -> float | None:
    """redis-benchmark's XADD MB/s on this server with a scored prefix of 2048 tokens at top-k 32 (bench_queue's size)."""
    from bench.bench_queue import xadd_ceiling

    size = 550_000  # bytes: docs/benchmarks.md, queue section (prompt 256 + response 2048, top-k 32 float32)
    try:
        return xadd_ceiling(url, size, 400, tmp) * size / 1e6
    except (SystemExit, subprocess.SubprocessError, OSError):
        return None

