"""Pipeline benchmark: the asynchronous pipeline (`opd up`) against a synchronous generate-score-train loop.

    python bench/bench_pipeline.py                    # tiny models: sync loops + 4 layouts, ~5 min on 2 idle cores
    python bench/bench_pipeline.py --quick            # seconds-long smoke version (tests/integration/test_bench_smoke.py)
    python bench/bench_pipeline.py --json runs/bench-pipeline.json --append docs/benchmarks.md
    python bench/bench_pipeline.py --pair models/smollm2 --steps 5 --warmup 2 --layouts 1x1 --sync-threads 1

WHY this comparison: the point of the actor -> teacher -> learner split is that the learner never waits
for generation and scoring, so it trains more tokens per second of wall time than a loop that generates,
scores and trains in turn. Both sides run in the same invocation, on the same machine, with the same
tiny student and teacher, truncation schedule, batch size, loss and learning rate (`configs/tiny-cpu.yaml`;
with `--pair DIR`, the real pair `opd models smollm2` builds, `configs/smollm2-cpu.yaml` shrunk to small
steps: scenario `smollm2`).
The ratio is against the better of the sync loops (1 thread or every core): on a shared machine a loop on
every core can be the slower one. Measured over the steps after a warm-up (startup and the drain excluded):

- learner tokens/s: response tokens trained per second of wall time (waiting included);
- idle: the part of that wall time the learner waited for data (async: `waited_s` in `history.jsonl`;
  sync: generation + scoring); other: neither waiting nor the optimizer step (publish, commit, Redis);
- step compute tokens/s: tokens per second of the optimizer step alone (shows CPU contention);
- Redis calls/step: every role's Redis commands (`INFO commandstats` of the bench's own redis-server,
  AOF everysec as `opd up` runs it) per learner step; load: the 1-minute load average at start and end;
- with py-spy installed, where each role's main thread spends its wall time (`bench/spy.py`): the
  learner's train step, wait, commit, weights write and announce, state and stats, time inside redis-py.

The async pipeline runs once per layout (`--layouts`: actors x teachers, e.g. `2x1`, optionally with a
generation batch, `2x1b16`); each role is one single-threaded process. The sync loop runs in this process
with the same components (HF engine, HF scorer without cache, the learner's batching and loss) and copies
the new weights into the engine in memory after each step (staleness 0). `--json` writes the measured
per-stage rates that `bench/scaling.py` turns into replica counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import redis_server
from bench.pipeline_runs import Result, run_async, run_sync, xadd_ceiling_mbps
from bench.spy import py_spy
from opd.config import load_config
from opd.tiny import TinyAssets, asset_paths, build_tiny_assets

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
PAIR_CONFIG = REPO / "configs" / "smollm2-cpu.yaml"
SECTION = "## Pipeline: asynchronous vs synchronous (`bench/bench_pipeline.py`)"

# (name, overrides on top of configs/tiny-cpu.yaml). "long" makes each step 4x heavier, so the fixed
# per-step cost of the async pipeline weighs less against generation and training.
SCENARIOS: dict[str, list[str]] = {
    "demo": [],
    "long": ["actor.max_new_tokens=64", "learner.batch_size=32", "actor.schedule={kind: full}"],
    # the real pair (--pair): configs/smollm2-cpu.yaml at CPU-sized steps (a 135M teacher decodes ~1 token/s/row here)
    "smollm2": ["actor.batch_size=2", "learner.batch_size=2", "actor.max_new_tokens=32", "actor.schedule={kind: full}",
                "teacher.batch_size=2", "learner.max_staleness=4"],
}


@dataclass
class Layout:
    actors: int
    teachers: int
    actor_batch: int | None = None

    @classmethod
    def parse(cls, text: str) -> Layout:
        """`AxT` or `AxTbN` (N: actor.batch_size)."""
        head, _, batch = text.partition("b")
        a, _, t = head.partition("x")
        if not (a.isdigit() and t.isdigit() and (not batch or batch.isdigit())):
            raise ValueError(f"layout {text!r}: expected AxT or AxTbN, e.g. 2x1 or 2x1b16")
        return cls(int(a), int(t), int(batch) if batch else None)

    def __str__(self) -> str:
        return f"{self.actors}x{self.teachers}" + (f"b{self.actor_batch}" if self.actor_batch else "")


@dataclass
class Scenario:
    name: str
    results: list[Result] = field(default_factory=list)
    settings: str = ""

    @property
    def best_sync(self) -> Result:
        return max((r for r in self.results if r.kind == "sync"), key=lambda r: r.tokens_per_s)

    @property
    def best_async(self) -> Result | None:
        return max((r for r in self.results if r.kind == "async"), key=lambda r: r.tokens_per_s, default=None)


def overrides_for(scenario: str, run_dir: Path, paths: object, steps: int) -> list[str]:
    p = paths
    return [
        f"run.workdir={run_dir}", "run.tiny_assets=null", "run.warm_cache=null", f"actor.model_dir={p.student_dir}",  # type: ignore[attr-defined]
        f"actor.prompts_file={p.prompts_file}", f"teacher.model_dir={p.teacher_dir}",  # type: ignore[attr-defined]
        f"teacher.cache_dir={run_dir / 'cache'}", f"learner.model_dir={p.student_dir}",  # type: ignore[attr-defined]
        f"learner.workdir={run_dir / 'learner'}", "learner.eval.heldout_file=", f"learner.checkpoint_every={steps}",
        *SCENARIOS[scenario],
    ]


def pair_paths(pair: Path) -> TinyAssets:
    """The real pair's dirs where `overrides_for` reads the tiny assets' (prompts: the repo's prompt set)."""
    for name in ("teacher", "student"):
        if not (pair / name / "config.json").is_file():
            raise SystemExit(f"bench: --pair {pair}: no {name}/config.json (opd models smollm2 --out {pair})")
    return TinyAssets(student_dir=pair / "student", teacher_dir=pair / "teacher",
                      prompts_file=REPO / "models" / "smollm2" / "prompts.jsonl",
                      heldout_file=REPO / "models" / "smollm2" / "heldout.jsonl")


def run_scenario(name: str, args: argparse.Namespace, work: Path, paths: object, url: str) -> Scenario:
    run_dir = work / name
    base = overrides_for(name, run_dir, paths, args.steps)
    cfg = load_config(args.config, base)
    sc = Scenario(name, settings=f"batch {cfg.learner.batch_size}, max_new_tokens {cfg.actor.max_new_tokens}, "
                                 f"{cfg.actor.schedule.kind} truncation, teacher top-k {cfg.teacher.topk}")
    for threads in args.sync_threads:
        sc.results.append(run_sync(cfg, args.steps, args.warmup, threads=threads))
        print(f"{name}: {sc.results[-1].name}: {sc.results[-1].tokens_per_s:,.0f} tokens/s", flush=True)
    for layout in args.layouts:
        lay_dir = work / name / str(layout)
        extra = [f"run.actors={layout.actors}", f"run.teachers={layout.teachers}", f"transport.redis_url={url}",
                 *( [f"actor.batch_size={layout.actor_batch}"] if layout.actor_batch else [])]
        over = [o.replace(str(run_dir), str(lay_dir)) for o in base] + extra
        res = run_async(over, args.steps, args.warmup, lay_dir, url, label=str(layout), profile=args.profile,
                        repo=REPO, config=args.config)
        sc.results.append(res)
        print(f"{name}: async {layout}: {res.tokens_per_s:,.0f} tokens/s ({res.note})", flush=True)
    return sc


def table(scenarios: list[Scenario]) -> str:
    lines = ["| scenario | run | steps | learner tokens/s | vs best sync | idle | other | step compute tokens/s "
             "| Redis round trips (commands) per step | load avg (start-end) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for sc in scenarios:
        ref = sc.best_sync.tokens_per_s
        for r in sc.results:
            calls = (f"{r.redis_reads_per_step:.0f} ({r.redis_calls_per_step:.0f})"
                     if r.redis_calls_per_step is not None and r.redis_reads_per_step is not None else "")
            lines.append(f"| {sc.name} | {r.name} | {r.steps} | {r.tokens_per_s:,.0f} | {r.tokens_per_s / ref:.2f}x | "
                         f"{r.idle_fraction:.2f} | {r.other_fraction:.2f} | {r.compute_tokens_per_s:,.0f} | {calls} | "
                         f"{r.load[0]:.1f}-{r.load[1]:.1f} |")
    return "\n".join(lines)


def profile_table(scenarios: list[Scenario]) -> str:
    """Where each role's main thread spent its wall time in the measured window (py-spy), one row per role."""
    rows = [(sc.name, r, role, prof) for sc in scenarios for r in sc.results if r.kind == "async"
            for role, prof in r.profiles.items() if prof]
    if not rows:
        return "(no py-spy profile: `pip install py-spy` and run with --profile)"
    lines = ["| scenario | layout | role | where the main thread's wall time went (fraction of samples) | in redis-py |",
             "|---|---|---|---|---:|"]
    for scenario, r, role, prof in rows:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in prof.items()
                          if k not in ("samples", "in redis-py calls") and v >= 0.005)
        lines.append(f"| {scenario} | {r.label} | {role} | {parts} | {prof.get('in redis-py calls', 0):.2f} |")
    return "\n".join(lines)


def stage_rates(scenarios: list[Scenario], xadd_mbps: float | None) -> dict[str, object]:
    """What bench/scaling.py reads: per-stage rates of one single-threaded replica (the 1-thread sync loop)."""
    out: dict[str, object] = {"xadd_mbps": xadd_mbps, "cores": os.cpu_count(), "scenarios": {}}
    for sc in scenarios:
        one = min((r for r in sc.results if r.kind == "sync"), key=lambda r: r.threads)
        best = sc.best_async
        out["scenarios"][sc.name] = {  # type: ignore[index]
            "stage_seconds_per_step": one.stages, "shape": one.shape, "stage_load": one.load,
            "sync_tokens_per_s": sc.best_sync.tokens_per_s, "best_async_layout": best.label if best else None,
            "best_async_tokens_per_s": best.tokens_per_s if best else None,
            "results": [asdict(r) for r in sc.results], "settings": sc.settings}
    return out


def report(scenarios: list[Scenario], args: argparse.Namespace, elapsed: float, xadd_mbps: float | None) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    command = shlex.join(["python", "bench/bench_pipeline.py", *sys.argv[1:]])
    best = [f"- {sc.name}: best layout on this machine: **{sc.best_async.label}** ({sc.best_async.tokens_per_s:,.0f} "
            f"tokens/s, {sc.best_async.tokens_per_s / sc.best_sync.tokens_per_s:.2f}x of the best sync loop); "
            f"{sc.settings}" for sc in scenarios if sc.best_async]
    notes = [f"- {sc.name} {r.label}: {r.note}" for sc in scenarios for r in sc.results if r.kind == "async"]
    return "\n".join([
        f"### Pipeline: async vs sync ({time.strftime('%Y-%m-%d %H:%M')})", "",
        f"Command: `{command}` on {os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {elapsed:.0f}s in all; "
        f"{args.steps} steps per run, the first {args.warmup} left out. XADD ceiling of a scored prefix here: "
        f"{xadd_mbps or 0:,.0f} MB/s.", "", table(scenarios), "", *best, *notes, "", profile_table(scenarios), "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="learner steps of each run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the measurement")
    parser.add_argument("--scenarios", default=None, help=f"comma-separated, from {sorted(SCENARIOS)} "
                        "(default: demo; smollm2 with --pair)")
    parser.add_argument("--pair", type=Path, default=None, help="a real pair (teacher/, student/) instead of the tiny models")
    parser.add_argument("--config", type=Path, default=None, help="pipeline config (default: configs/tiny-cpu.yaml; "
                        "configs/smollm2-cpu.yaml with --pair)")
    parser.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="async layouts: actors x teachers[, b: actor batch]")
    parser.add_argument("--sync-threads", default=f"{os.cpu_count() or 1},1", help="torch threads of each sync loop run")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=py_spy() is not None,
                        help="py-spy the roles in the measured window (default: when py-spy is installed)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (6 steps, sync on 1 thread, layout 1x1, no profile)")
    parser.add_argument("--work", type=Path, default=None, help="work dir (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, default=None, help="write the results and per-stage rates here")
    parser.add_argument("--append", type=Path, default=None, help="add the report under this benchmark's section")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.layouts, args.profile, args.sync_threads = 6, 2, "1x1", False, "1"
    if args.warmup < 1 or args.steps <= args.warmup + 1:
        parser.error("need 1 <= --warmup < --steps - 1")
    args.config = args.config or (PAIR_CONFIG if args.pair else CONFIG)
    scenarios = [x for x in (args.scenarios or ("smollm2" if args.pair else "demo")).split(",") if x]
    if unknown := sorted(set(scenarios) - set(SCENARIOS)):
        parser.error(f"unknown scenarios {unknown}")
    try:
        args.sync_threads = sorted({int(x) for x in args.sync_threads.split(",") if x}, reverse=True)
        args.layouts = [Layout.parse(x) for x in args.layouts.split(",") if x]
    except ValueError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-pipeline-")))
        work.mkdir(parents=True, exist_ok=True)
        url = stack.enter_context(redis_server(None, work, aof=True))
        if args.pair:
            paths = pair_paths(args.pair)
        else:
            build_tiny_assets(work / "assets", seed=0)
            paths = asset_paths(work / "assets")
        xadd = None if args.quick else xadd_ceiling_mbps(url, work)
        done = [run_scenario(name, args, work, paths, url) for name in scenarios]
    section = report(done, args, time.perf_counter() - started, xadd)
    print("\n" + section)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(stage_rates(done, xadd), indent=1, default=str))
        print(f"wrote {args.json}")
    if args.append:
        append_under_section(args.append, section)
        print(f"appended to {args.append}")
    return 0


def append_under_section(path: Path, block: str) -> None:
    """Add ``block`` at the end of this benchmark's section of ``path`` (other sections stay as they are)."""
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
