#!/usr/bin/env bash
# GPU smoke test: the whole pipeline (actors -> teachers -> learner) for a few learner steps on this
# GPU host, then the throughput of each stage: actor, teacher and learner tokens/s.
#
# Why a script and not a pytest test: it needs a CUDA GPU (and, for --engine sglang, SGLang and real
# models), which CI does not have. It is the first thing to run on a new GPU host, and it fails at
# once, saying why, where there is no GPU.
#
# usage: scripts/gpu-smoke.sh [--engine hf|sglang] [--steps N] [--config FILE] [--workdir DIR] [--set KEY=VALUE]...
#
#   --engine hf       (default) actors and teachers embed transformers; every role runs on CUDA (the
#                     learner autocasts to bf16 there). Models: tiny ones built in code, or your own
#                     with OPD_STUDENT_DIR, OPD_TEACHER_DIR and OPD_PROMPTS (HF dirs, prompts JSONL).
#   --engine sglang   student and teacher served by `python -m sglang.launch_server` on free loopback
#                     ports (OPD_STUDENT_DIR, OPD_TEACHER_DIR, OPD_PROMPTS required), stopped at the end.
#   --steps N         learner steps (default 20)
#   --config FILE     base config (default: configs/tiny-cpu.yaml for tiny models, configs/compose.yaml
#                     for your own)
#   --workdir DIR     outputs and logs (default runs/gpu-smoke-ENGINE; wiped first)
#   --set KEY=VALUE   passed on to `opd up`, e.g. --set run.actors=2 (repeatable)
#
# environment:
#   PYTHON                      interpreter with the project installed (default .venv/bin/python)
#   NVIDIA_SMI                  nvidia-smi to query the GPUs with (default: nvidia-smi on PATH)
#   OPD_HELDOUT                 held-out prompts JSONL for the learner's evaluation (own models; off if unset)
#   OPD_STUDENT_GPU, OPD_TEACHER_GPU    sglang: GPU of each server (default 0 and 1; both 0 on a one-GPU host)
#   OPD_STUDENT_MEM_FRACTION, OPD_TEACHER_MEM_FRACTION   sglang --mem-fraction-static of each server
#   OPD_SGLANG_ARGS             extra arguments for both servers (word-split)
#   OPD_SGLANG_START_TIMEOUT_S  how long a server may take to answer /health (default 900)
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "gpu-smoke: error: $*" >&2
  exit 1
}

usage() {
  sed -n '/^# usage:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

ENGINE=hf
STEPS=20
CONFIG=""
WORKDIR=""
EXTRA_SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) ENGINE=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --engine=*) ENGINE=${1#*=}; shift ;;
    --steps) STEPS=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --steps=*) STEPS=${1#*=}; shift ;;
    --config) CONFIG=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --workdir) WORKDIR=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --set) EXTRA_SETS+=(--set "${2:-}"); shift 2 || { usage >&2; exit 2; } ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-smoke: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$ENGINE" in
  hf|sglang) ;;
  *) echo "gpu-smoke: --engine must be hf or sglang, not '$ENGINE'" >&2; exit 2 ;;
esac
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu-smoke: --steps must be a positive integer, not '$STEPS'" >&2; exit 2; }

# ---------------------------------------------------------------- is there a GPU at all?
PY=${PYTHON:-.venv/bin/python}
SMI=${NVIDIA_SMI:-nvidia-smi}
command -v "$SMI" >/dev/null 2>&1 \
  || die "no NVIDIA GPU: '$SMI' not found. This smoke test needs a CUDA GPU host with the NVIDIA driver; on a CPU machine run scripts/demo.sh instead."
GPU_LIST=$("$SMI" -L 2>&1) || die "no usable NVIDIA GPU: '$SMI -L' failed: $GPU_LIST"
NUM_GPUS=$(grep -c '^GPU ' <<<"$GPU_LIST" || true)
[ "$NUM_GPUS" -gt 0 ] || die "no NVIDIA GPU: '$SMI -L' lists none ($GPU_LIST)"
[ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 || die "no Python at $PY: run scripts/setup.sh first (or set PYTHON)"
TORCH_CUDA=$("$PY" -c 'import torch; ok = torch.cuda.is_available(); print(torch.cuda.get_device_name(0) if ok else "none", torch.__version__, torch.version.cuda, sep="|")' 2>&1) \
  || die "cannot import torch with $PY: $TORCH_CUDA"
IFS='|' read -r CUDA_NAME TORCH_VERSION TORCH_CUDA_VERSION <<<"$TORCH_CUDA"
if [ "$CUDA_NAME" = "none" ]; then
  hint="CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-<unset>}'"
  if [ "$TORCH_CUDA_VERSION" = "None" ]; then
    hint="this is a CPU build of torch: install a CUDA one, e.g. $PY -m pip install torch --index-url https://download.pytorch.org/whl/cu124"
  fi
  die "torch $TORCH_VERSION sees no CUDA device although nvidia-smi lists $NUM_GPUS GPU(s) ($hint)"
fi
echo "==> GPU: $CUDA_NAME ($NUM_GPUS visible to nvidia-smi), torch $TORCH_VERSION, CUDA $TORCH_CUDA_VERSION"

# ---------------------------------------------------------------- models and config
WORKDIR=$(realpath -m "${WORKDIR:-runs/gpu-smoke-$ENGINE}")
STUDENT=${OPD_STUDENT_DIR:-}
TEACHER=${OPD_TEACHER_DIR:-}
PROMPTS=${OPD_PROMPTS:-}
SETS=()
if [ -z "$STUDENT$TEACHER$PROMPTS" ] && [ "$ENGINE" = hf ]; then
  ASSETS="$WORKDIR/assets"
  STUDENT="$ASSETS/student"; TEACHER="$ASSETS/teacher"; PROMPTS="$ASSETS/prompts.jsonl"
  CONFIG=${CONFIG:-configs/tiny-cpu.yaml}
  SETS+=(--set "run.tiny_assets=$ASSETS" --set "run.warm_cache=$ASSETS/prompts.jsonl" --set "learner.eval.heldout_file=$ASSETS/heldout.jsonl"
         --set "learner.eval.teacher_dir=$TEACHER")
  echo "==> tiny models built in code (set OPD_STUDENT_DIR, OPD_TEACHER_DIR, OPD_PROMPTS for your own)"
else
  for var in OPD_STUDENT_DIR OPD_TEACHER_DIR OPD_PROMPTS; do
    [ -n "${!var:-}" ] || die "--engine $ENGINE with your own models needs $var (set OPD_STUDENT_DIR, OPD_TEACHER_DIR and OPD_PROMPTS)"
    [ -e "${!var}" ] || die "$var=${!var} does not exist"
  done
  CONFIG=${CONFIG:-configs/compose.yaml}
  SETS+=(--set "run.tiny_assets=null" --set "run.warm_cache=null" --set "learner.eval.heldout_file=${OPD_HELDOUT:-}"
         --set "learner.eval.teacher_dir=$TEACHER")
fi
[ -f "$CONFIG" ] || die "config $CONFIG does not exist"
command -v redis-server >/dev/null 2>&1 || die "redis-server not found: apt-get install redis-server (scripts/setup.sh does)"

rm -rf "$WORKDIR"
mkdir -p "$WORKDIR/logs" "$WORKDIR/redis"
NS="smoke"

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------- processes this script owns
PIDS=()      # redis-server
GROUPS_=()   # SGLang servers, each the leader of its own process group (they fork workers)
cleanup() {
  local pid
  for pid in "${GROUPS_[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${GROUPS_[@]}" "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A Redis of our own (rather than the one `opd up` starts and stops): the run-wide stats hash must
# still be readable after the run.
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode yes --save "" --appendonly no \
  --dir "$WORKDIR/redis" --logfile "$WORKDIR/logs/redis.log" &
PIDS+=($!)
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
"$PY" - "$REDIS_URL" <<'EOF' || die "redis-server did not start (see $WORKDIR/logs/redis.log)"
import sys, time
import redis
client = redis.Redis.from_url(sys.argv[1])
deadline = time.monotonic() + 15
while True:
    try:
        client.ping()
        break
    except redis.ConnectionError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.05)
EOF

wait_healthy() {  # name url pid log
  local timeout=${OPD_SGLANG_START_TIMEOUT_S:-900}
  echo "==> waiting for $1 at $2/health (up to ${timeout}s; log: $4)"
  "$PY" - "$2/health" "$3" "$timeout" <<'EOF' || { tail -n 40 "$4" >&2 || true; die "$1 did not become healthy (log: $4)"; }
import os, sys, time, urllib.request
url, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"the server (pid {pid}) exited")
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            if resp.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(2)
sys.exit(f"no answer after {timeout:.0f}s")
EOF
}

start_sglang() {  # name model gpu mem_fraction port -> pid in LAST_PID
  local log="$WORKDIR/logs/$1-sglang.log"
  local extra=()
  read -r -a extra <<<"${OPD_SGLANG_ARGS:-}"
  echo "==> starting $1 SGLang server: $2 on GPU $3, port $5, --mem-fraction-static $4"
  CUDA_VISIBLE_DEVICES="$3" SGLANG_RETURN_ORIGINAL_LOGPROB="${SGLANG_RETURN_ORIGINAL_LOGPROB:-false}" \
    setsid "$PY" -m sglang.launch_server --model-path "$2" --host 127.0.0.1 --port "$5" \
    --mem-fraction-static "$4" "${extra[@]}" >"$log" 2>&1 &
  LAST_PID=$!
  GROUPS_+=("$LAST_PID")
}

if [ "$ENGINE" = sglang ]; then
  "$PY" -c 'import sglang' 2>/dev/null || die "sglang is not installed for $PY: $PY -m pip install -e '.[sglang]'"
  STUDENT_GPU=${OPD_STUDENT_GPU:-0}
  if [ "$NUM_GPUS" -gt 1 ]; then TEACHER_GPU=${OPD_TEACHER_GPU:-1}; else TEACHER_GPU=${OPD_TEACHER_GPU:-0}; fi
  if [ "$STUDENT_GPU" = "$TEACHER_GPU" ]; then
    # One GPU for both servers and the learner (which trains on cuda:0): leave it room.
    STUDENT_FRAC=${OPD_STUDENT_MEM_FRACTION:-0.25}; TEACHER_FRAC=${OPD_TEACHER_MEM_FRACTION:-0.45}
  else
    STUDENT_FRAC=${OPD_STUDENT_MEM_FRACTION:-0.5}; TEACHER_FRAC=${OPD_TEACHER_MEM_FRACTION:-0.85}
  fi
  STUDENT_PORT=$(free_port)
  start_sglang student "$STUDENT" "$STUDENT_GPU" "$STUDENT_FRAC" "$STUDENT_PORT"
  STUDENT_PID=$LAST_PID
  TEACHER_PORT=$(free_port)
  start_sglang teacher "$TEACHER" "$TEACHER_GPU" "$TEACHER_FRAC" "$TEACHER_PORT"
  TEACHER_PID=$LAST_PID
  wait_healthy "the student server" "http://127.0.0.1:$STUDENT_PORT" "$STUDENT_PID" "$WORKDIR/logs/student-sglang.log"
  wait_healthy "the teacher server" "http://127.0.0.1:$TEACHER_PORT" "$TEACHER_PID" "$WORKDIR/logs/teacher-sglang.log"
  SETS+=(--set actor.engine=sglang --set "actor.engine.url=http://127.0.0.1:$STUDENT_PORT"
         --set teacher.engine=sglang --set "teacher.engine.url=http://127.0.0.1:$TEACHER_PORT")
else
  SETS+=(--set actor.engine.device=cuda --set teacher.engine.device=cuda)
fi

SETS+=(--set "transport.redis_url=$REDIS_URL" --set "transport.namespace=$NS" --set "run.workdir=$WORKDIR"
       --set run.fresh=true --set learner.device=cuda --set "learner.workdir=$WORKDIR/learner"
       --set "teacher.cache_dir=$WORKDIR/cache" --set "actor.model_dir=$STUDENT" --set "learner.model_dir=$STUDENT"
       --set "teacher.model_dir=$TEACHER" --set "actor.prompts_file=$PROMPTS")

# ---------------------------------------------------------------- the run, sampled, and the report
echo "==> opd up: engine $ENGINE, $STEPS learner steps, config $CONFIG, outputs in $WORKDIR"
"$PY" - "$REDIS_URL" "$NS" "$WORKDIR" "$STEPS" "$ENGINE" "$CUDA_NAME" -- \
  "$PY" -m opd.cli up --config "$CONFIG" --steps "$STEPS" --no-progress "${SETS[@]}" "${EXTRA_SETS[@]}" <<'EOF'
"""Run `opd up`, sample the run-wide stats hash while it runs, then print tokens/s per stage.

Why sample: Prometheus counters die with the roles, and the stats hash (protocol.ledger.stats) only
holds totals; rates over the steady state (from the learner's first step to its last) need the totals
at those two moments. Model loading and the drain at the end would otherwise dilute them.
"""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis

from protocol import ledger
from protocol.names import Names
from protocol.state import LearnerState, read_state

redis_url, ns, workdir, steps, engine, gpu = sys.argv[1:7]
cmd = sys.argv[8:]
steps_wanted = int(steps)
client = redis.Redis.from_url(redis_url)
names = Names(ns)
samples: list[tuple[float, int, dict[str, float]]] = []


def sample() -> None:
    state = read_state(client, names)
    step = state.step if isinstance(state, LearnerState) else 0
    samples.append((time.time(), step, ledger.stats(client, names)))


t_start = time.time()
proc = subprocess.Popen(cmd)
try:
    while proc.poll() is None:
        sample()
        time.sleep(0.1)
except KeyboardInterrupt:
    proc.wait()
    raise
sample()
code = proc.returncode
if code != 0:
    sys.exit(f"gpu-smoke: error: `opd up` exited with {code}; role logs in {Path(workdir) / 'logs'}")
rows = [json.loads(x) for x in (Path(workdir) / "learner" / "history.jsonl").read_text().splitlines() if x.strip()]
# The learner may train a few more steps while draining what was in flight once it reached --steps;
# actors have stopped producing by then, so those steps are not steady state.
history = [r for r in rows if r["step"] <= steps_wanted]
if len(history) < 2:
    sys.exit(f"gpu-smoke: error: only {len(history)} learner steps recorded; need at least 2 to measure a rate")

# Steady state: from the end of the learner's first step to the end of step --steps.
t0, t1 = history[0]["time"], history[-1]["time"]
before = [s for s in samples if s[0] <= t0] or samples[:1]
after = [s for s in samples if s[0] >= t1] or samples[-1:]
s0, s1 = before[-1], after[0]
dt = max(s1[0] - s0[0], 1e-9)


def delta(key: str) -> float:
    return s1[2].get(key, 0.0) - s0[2].get(key, 0.0)


actor_tps = delta("actor_tokens_generated") / dt
teacher_scored_tps = delta("teacher_tokens_scored") / dt
teacher_cached_tps = delta("teacher_tokens_cached") / dt
learner_tokens = sum(r["tokens"] for r in history[1:])
learner_tps = learner_tokens / max(t1 - t0, 1e-9)
learner_step_tps = statistics.median(r["tokens_per_second"] for r in history)
totals = samples[-1][2]

print()
print(f"gpu-smoke: engine {engine}, {len(rows)} learner steps on {gpu}, "
      f"{time.time() - t_start:.0f}s in all; rates over steps 1..{len(history)} ({t1 - t0:.1f}s, Redis {ns}:stats)")
print(f"  {'stage':<8} {'tokens/s':>10}   what")
print(f"  {'actor':<8} {actor_tps:>10.0f}   student tokens generated (all actors); total {totals.get('actor_tokens_generated', 0):.0f}, "
      f"at most {totals.get('actor_tokens_saved', 0):.0f} saved by truncation (budget bound; opd top shows the probe estimate)")
print(f"  {'teacher':<8} {teacher_scored_tps + teacher_cached_tps:>10.0f}   response tokens scored + from cache "
      f"({teacher_scored_tps:.0f} + {teacher_cached_tps:.0f}); total {totals.get('teacher_tokens_scored', 0):.0f} scored, "
      f"{totals.get('teacher_tokens_cached', 0):.0f} cached")
print(f"  {'learner':<8} {learner_tps:>10.0f}   tokens trained per wall second (median of its own per-step figure: "
      f"{learner_step_tps:.0f}); history {Path(workdir) / 'learner' / 'history.jsonl'}")
problems = []
if len(history) < steps_wanted:
    problems.append(f"only {len(history)} of {steps_wanted} learner steps")
for stage, rate in (("actor", actor_tps), ("teacher", teacher_scored_tps + teacher_cached_tps), ("learner", learner_tps)):
    if rate <= 0:
        problems.append(f"no {stage} throughput measured")
if problems:
    sys.exit("gpu-smoke: error: " + "; ".join(problems))
print("gpu-smoke: ok")
EOF
