#!/usr/bin/env bash
# GPU smoke check: proves a GPU host in under 8 minutes (a 480 s overall timeout), phase by phase, and
# prints each phase's time. The first thing to run on a new GPU host; CI has no GPU.
#
# usage: scripts/gpu-smoke.sh [--dry-run] [--wheels DIR] [--workdir DIR] [--steps N] [--no-sglang]
#
#   --dry-run       print every phase it would run and why any is skipped, run nothing, exit 0
#   --wheels DIR    first pip-install the project and its newer dependencies from DIR with --no-index
#                   (an air-gapped host: build DIR with scripts/gpu-wheels.sh; docs/deploy.md says
#                   what it holds). DIR/bin/redis-server is used when PATH has none.
#   --workdir DIR   models, logs and run outputs (default runs/gpu-smoke; wiped first)
#   --steps N       learner steps of each pipeline run (default 8)
#   --no-sglang     skip the SGLang phases even when OPD_SGLANG_PYTHON is set
#
# phases:
#   preflight        the NVIDIA driver lists a GPU; redis-server; the SGLang interpreter (if any)
#   wheels           pip install --no-index --find-links DIR (skipped without --wheels)
#   python           CUDA torch, transformers >= 5.24 (the HF engine's forward(cache=)), the project
#   models           tiny GPU models built in code (opd/tiny_gpu.py: head size 64, bf16, 1024 ids)
#   hf-pipeline      `opd up`: HF engine sampling on CUDA at T=0.7, CUDA learner, N steps; the learner
#                    barely moves (lr 1e-12), so every sample is on policy: the importance ratio must be 1
#                    up to the bf16 rounding of the learner's body (its head is float32; learner/precision.py)
#   sglang-student   the student server from $OPD_SGLANG_PYTHON (--enable-deterministic-inference)
#   sglang-teacher   the teacher server, started once the student's is healthy (each sizes its memory
#                    pool from what is free when it starts)
#   sglang-pipeline  `opd up` with both SGLang engines, N steps (actors reload published weights)
#   sglang-live      tests/integration/test_sglang_live*.py against both: budgets, stop at EOS,
#                    logprobs against transformers at T=0.7, seeds, scoring, load_weights with
#                    weight_version, abort and retry; a skipped test fails the phase. After the
#                    pipeline: these tests load weight versions above any the pipeline publishes.
# The SGLang phases run only when OPD_SGLANG_PYTHON names an interpreter that imports sglang: the
# server runs from its own interpreter or image, never from the project's (docs/deploy.md).
#
# environment:
#   PYTHON                      interpreter with CUDA torch and the project (default .venv/bin/python, else python3)
#   NVIDIA_SMI                  nvidia-smi to query the driver with (default: nvidia-smi on PATH)
#   OPD_SGLANG_PYTHON           python that has sglang installed (its own venv or image); unset: no SGLang phases
#   OPD_SGLANG_ARGS             extra arguments for both servers (word-split)
#   OPD_SMOKE_TIMEOUT_S         overall timeout (default 480)
#   OPD_SMOKE_RATIO_MEAN_TOL    hf-pipeline: largest |ratio_mean - 1| of a step (default 0.005)
#   OPD_SMOKE_RATIO_MAX         hf-pipeline: largest ratio of any token (default 1.1)
#   CUDA_VISIBLE_DEVICES        as usual: every phase uses the first visible GPU
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_NUMERIC=C  # $EPOCHREALTIME and awk agree on the decimal point

usage() {
  sed -n '/^# usage:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}
die() {
  echo "gpu-smoke: error: $*" >&2
  exit 1
}

DRY_RUN=0
WHEELS=""
WORKDIR=""
STEPS=8
NO_SGLANG=0
ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --wheels) WHEELS=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --workdir) WORKDIR=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --steps) STEPS=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --no-sglang) NO_SGLANG=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-smoke: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu-smoke: --steps must be a positive integer, not '$STEPS'" >&2; exit 2; }
[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || { echo "gpu-smoke: --wheels $WHEELS is not a directory" >&2; exit 2; }
TIMEOUT_S=${OPD_SMOKE_TIMEOUT_S:-480}
[[ "$TIMEOUT_S" =~ ^[1-9][0-9]*$ ]] || { echo "gpu-smoke: OPD_SMOKE_TIMEOUT_S must be a positive integer, not '$TIMEOUT_S'" >&2; exit 2; }

# The overall timeout: the script runs itself again under timeout(1), whose TERM reaches this shell and
# the processes it waits for; the EXIT trap then stops the servers and prints the phases so far.
if [ "$DRY_RUN" = 0 ] && [ -z "${OPD_SMOKE_INNER:-}" ]; then
  exec timeout --kill-after=30 "$TIMEOUT_S" env OPD_SMOKE_INNER=1 bash "$0" "${ARGS[@]}"
fi

PY=${PYTHON:-.venv/bin/python}
if [ -z "${PYTHON:-}" ] && [ ! -x "$PY" ]; then PY=python3; fi
SMI=${NVIDIA_SMI:-nvidia-smi}
SGLANG_PY=${OPD_SGLANG_PYTHON:-}
WORKDIR=$(realpath -m "${WORKDIR:-runs/gpu-smoke}")
ASSETS="$WORKDIR/assets"
RATIO_MEAN_TOL=${OPD_SMOKE_RATIO_MEAN_TOL:-0.005}
RATIO_MAX=${OPD_SMOKE_RATIO_MAX:-1.1}
PINNED=$(sed -n 's/^SGLANG_VERSION = "\(.*\)"$/\1/p' protocol/sglang_version.py)

# ---------------------------------------------------------------- the plan: what runs, what is skipped and why
PHASES=(preflight wheels python models hf-pipeline sglang-student sglang-teacher sglang-pipeline sglang-live)
declare -A SKIP=()
if [ -z "$WHEELS" ]; then
  SKIP[wheels]="no --wheels DIR: the packages $PY has are used as they are"
fi
SGLANG_SKIP=""
if [ "$NO_SGLANG" = 1 ]; then
  SGLANG_SKIP="--no-sglang"
elif [ -z "$SGLANG_PY" ]; then
  SGLANG_SKIP="OPD_SGLANG_PYTHON is not set (the python of SGLang's own venv or image; docs/deploy.md)"
elif ! command -v "$SGLANG_PY" >/dev/null 2>&1; then
  SGLANG_SKIP="OPD_SGLANG_PYTHON=$SGLANG_PY is not an executable"
elif ! SGLANG_VERSION=$("$SGLANG_PY" -c 'import sglang; print(sglang.__version__)' 2>&1); then
  SGLANG_SKIP="OPD_SGLANG_PYTHON=$SGLANG_PY cannot import sglang: $(tail -n 1 <<<"$SGLANG_VERSION")"
fi
if [ -n "$SGLANG_SKIP" ]; then
  for phase in sglang-student sglang-teacher sglang-live sglang-pipeline; do SKIP[$phase]="$SGLANG_SKIP"; done
fi

if [ -n "$SGLANG_SKIP" ]; then
  SGLANG_WHAT="no SGLang interpreter, so no SGLang phases"
else
  SGLANG_WHAT="SGLang $SGLANG_VERSION at $SGLANG_PY (pinned: $PINNED)"
fi
declare -A WHAT=(
  [preflight]="$SMI -L lists a GPU; redis-server on PATH${WHEELS:+ or in $WHEELS/bin}; $SGLANG_WHAT"
  [wheels]="$PY -m pip install --no-index --find-links $WHEELS opd pytest"
  [python]="$PY: torch with CUDA, transformers >= 5.24, the project's packages"
  [models]="opd.tiny_gpu.build_gpu_assets -> $ASSETS (student and teacher: head size 64, bf16, 1024 ids)"
  [hf-pipeline]="opd up --config configs/tiny-cpu.yaml --steps $STEPS: HF engine and scorer on cuda, learner.device=cuda, T=0.7, lr 1e-12; |ratio_mean - 1| <= $RATIO_MEAN_TOL, ratio_max <= $RATIO_MAX"
  [sglang-student]="$SGLANG_PY -m sglang.launch_server --model-path $ASSETS/student --enable-deterministic-inference (first visible GPU, --mem-fraction-static 0.2, --cuda-graph-max-bs 16)"
  [sglang-teacher]="$SGLANG_PY -m sglang.launch_server --model-path $ASSETS/teacher (after the student is healthy, --mem-fraction-static 0.2)"
  [sglang-live]="$PY -m pytest -m sglang tests/integration/test_sglang_live.py tests/integration/test_sglang_live_more.py (no skips allowed)"
  [sglang-pipeline]="opd up --steps $STEPS with actor.engine=sglang and teacher.engine=sglang at both servers"
)

# ---------------------------------------------------------------- phases: timing, summary, cleanup
SUMMARY=()
SUMMARY_SHOWN=0
NUM_GPUS=0
STUDENT_PORT=""
TEACHER_PORT=""
CURRENT=""
PHASE_T0=""
SCRIPT_T0=$EPOCHREALTIME
GROUPS_=()   # SGLang servers, each the leader of its own process group (they fork workers)

elapsed() {  # seconds since $1 (an $EPOCHREALTIME), one decimal
  awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}

summary() {
  local line
  echo
  echo "gpu-smoke: phases ($(elapsed "$SCRIPT_T0")s in all, budget ${TIMEOUT_S}s)"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
}

cleanup() {
  local code=$? pid
  if [ -n "$CURRENT" ]; then SUMMARY+=("$(printf '%-16s FAILED after %ss' "$CURRENT" "$(elapsed "$PHASE_T0")")"); fi
  for pid in "${GROUPS_[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${GROUPS_[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  [ "$DRY_RUN" = 1 ] || [ "$SUMMARY_SHOWN" = 1 ] || summary
  exit "$code"
}
trap cleanup EXIT
trap 'echo "gpu-smoke: error: stopped (the ${TIMEOUT_S}s budget ran out, or a signal) during phase ${CURRENT:-none}" >&2; exit 124' TERM
trap 'exit 130' INT

run_phase() {  # name: runs phase_<name with _ for ->, or says why not
  local name=$1 n=$2
  local fn="phase_${name//-/_}"
  if [ -n "${SKIP[$name]:-}" ]; then
    echo "==> [$n/${#PHASES[@]} $name] skipped: ${SKIP[$name]}"
    SUMMARY+=("$(printf '%-16s skipped: %s' "$name" "${SKIP[$name]}")")
    return
  fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "==> [$n/${#PHASES[@]} $name] would run: ${WHAT[$name]}"
    if [ "$name" = preflight ] && ! command -v "$SMI" >/dev/null 2>&1; then
      echo "    (on this machine it would stop here: '$SMI' not found, so this is not a GPU host)"
    fi
    if [ "$name" = preflight ] && [ -z "$SGLANG_SKIP" ] && [ "$SGLANG_VERSION" != "$PINNED" ]; then
      echo "    warning: SGLang $SGLANG_VERSION is not the pinned $PINNED (protocol/sglang_version.py): its request schema may differ"
    fi
    return
  fi
  echo "==> [$n/${#PHASES[@]} $name] ${WHAT[$name]}"
  CURRENT=$name
  PHASE_T0=$EPOCHREALTIME
  "$fn"
  SUMMARY+=("$(printf '%-16s ok in %ss' "$name" "$(elapsed "$PHASE_T0")")")
  echo "    [$name] ok in $(elapsed "$PHASE_T0")s"
  CURRENT=""
}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------- the phases
phase_preflight() {
  command -v "$SMI" >/dev/null 2>&1 \
    || die "no NVIDIA GPU: '$SMI' not found. This smoke check needs a CUDA GPU host with the NVIDIA driver; on a CPU machine run scripts/demo.sh instead (or see the plan with --dry-run)."
  local gpus
  gpus=$("$SMI" -L 2>&1) || die "no usable NVIDIA GPU: '$SMI -L' failed: $gpus"
  NUM_GPUS=$(grep -c '^GPU ' <<<"$gpus" || true)
  [ "$NUM_GPUS" -gt 0 ] || die "no NVIDIA GPU: '$SMI -L' lists none ($gpus)"
  echo "    $NUM_GPUS GPU(s): $(head -n 1 <<<"$gpus")"
  if ! command -v redis-server >/dev/null 2>&1; then
    if [ -z "$WHEELS" ] || [ ! -x "$WHEELS/bin/redis-server" ]; then
      die "redis-server not found: apt-get install redis-server, or carry one in --wheels DIR/bin (docs/deploy.md)"
    fi
    PATH="$(realpath "$WHEELS/bin"):$PATH"
    export PATH
  fi
  echo "    $(redis-server --version)"
  if [ -n "$SGLANG_SKIP" ]; then
    echo "    the SGLang phases are skipped: $SGLANG_SKIP"
  else
    echo "    SGLang $SGLANG_VERSION at $SGLANG_PY"
    [ "$SGLANG_VERSION" = "$PINNED" ] \
      || echo "    warning: SGLang $SGLANG_VERSION is not the pinned $PINNED (protocol/sglang_version.py): its request schema may differ"
  fi
}

phase_wheels() {
  local project=("$WHEELS"/opd-*.whl)
  [ -f "${project[0]}" ] || die "no project wheel (opd-*.whl) in $WHEELS: build the folder with scripts/gpu-wheels.sh"
  "$PY" -m pip install --no-index --find-links "$WHEELS" --disable-pip-version-check -q "${project[0]}" pytest \
    || die "pip install from $WHEELS failed (above): the folder lacks a wheel this host needs (docs/deploy.md lists them)"
}

phase_python() {
  [ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 || die "no Python at $PY: set PYTHON (docs/deploy.md, 'Smoke test on a GPU host')"
  local out
  out=$("$PY" - "$NUM_GPUS" "${SGLANG_SKIP:-}" 2>&1 <<'EOF'
import os
import sys

import torch

gpus, sglang_skipped = sys.argv[1], sys.argv[2]
if not torch.cuda.is_available():
    hint = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}"
    if torch.version.cuda is None:
        hint = f"this is a CPU build of torch: use an interpreter with CUDA torch, not {sys.executable}"
    sys.exit(f"torch {torch.__version__} sees no CUDA device although nvidia-smi lists {gpus} GPU(s) ({hint})")
import transformers
from packaging.version import Version

if Version(transformers.__version__) < Version("5.24"):
    sys.exit(f"transformers {transformers.__version__} is older than 5.24, whose forward(cache=) the HF engine needs: "
             "carry a newer wheel and pass --wheels DIR (docs/deploy.md)")
import actors, cache, learner, opd, protocol  # noqa: F401, E401  the project itself

if not sglang_skipped:
    import pytest  # noqa: F401  the sglang-live phase runs it
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, python {sys.version.split()[0]}")
EOF
) || die "$out"
  echo "    $out"
}

phase_models() {
  rm -rf "$WORKDIR"
  mkdir -p "$WORKDIR/logs"
  "$PY" -c 'import sys, pathlib; from opd.tiny_gpu import build_gpu_assets; build_gpu_assets(pathlib.Path(sys.argv[1]), teacher_steps=100, student_warmup_steps=30, log=print)' \
    "$ASSETS" | sed 's/^/    /'
}

run_opd() {  # name extra-sets...: `opd up` on the GPU models into $WORKDIR/name, log in logs/name.log
  local name=$1
  shift
  local out="$WORKDIR/$name" log="$WORKDIR/logs/$name.log"
  echo "    opd up ($name): log $log"
  timeout 200 "$PY" -m opd.cli up --config configs/tiny-cpu.yaml --steps "$STEPS" --no-progress \
    --set run.workdir="$out" --set run.tiny_assets=null --set run.warm_cache=null --set run.fresh=true \
    --set transport.namespace="smoke-$name" --set learner.device=cuda --set learner.workdir="$out/learner" \
    --set teacher.cache_dir="$out/cache" --set actor.model_dir="$ASSETS/student" --set learner.model_dir="$ASSETS/student" \
    --set teacher.model_dir="$ASSETS/teacher" --set actor.prompts_file="$ASSETS/prompts.jsonl" \
    --set learner.eval.heldout_file="$ASSETS/heldout.jsonl" --set learner.eval.teacher_dir="$ASSETS/teacher" \
    "$@" >"$log" 2>&1 || { tail -n 30 "$log" >&2; die "opd up ($name) failed (log: $log)"; }
}

check_history() {  # history.jsonl mean-tol|- max: the steps were done; with tolerances, the on-policy ratio is 1 within them
  "$PY" - "$1" "$STEPS" "$2" "${3:--}" <<'EOF' | sed 's/^/    /'
import json
import math
import statistics
import sys

path, steps, tol, largest = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = [json.loads(line) for line in open(path) if line.strip()]
if len(rows) < steps:
    sys.exit(f"gpu-smoke: error: {len(rows)} of {steps} learner steps in {path}")
means = [r["ratio_mean"] for r in rows]
maxima = [r["ratio_max"] for r in rows]
print(f"{len(rows)} steps, median {statistics.median(r['tokens_per_second'] for r in rows):.0f} tokens/s, "
      f"reverse KL {rows[0]['reverse_kl']:.4f} -> {rows[-1]['reverse_kl']:.4f}")
print(f"importance ratio: mean in [{min(means):.6f}, {max(means):.6f}], largest {max(maxima):.6f}")
if not all(math.isfinite(x) for x in means + maxima + [r["loss"] for r in rows]):
    sys.exit("gpu-smoke: error: a non-finite loss or ratio")
if tol != "-":
    worst = max(abs(m - 1) for m in means)
    if worst > float(tol) or max(maxima) > float(largest):
        sys.exit(f"gpu-smoke: error: on policy the importance ratio must be 1, but a step's mean is off by {worst:.6f} "
                 f"(OPD_SMOKE_RATIO_MEAN_TOL={tol}) and the largest is {max(maxima):.6f} (OPD_SMOKE_RATIO_MAX={largest}): "
                 "the learner's log-probs differ from the actor's (wrong temperature, positions or precision)")
    print(f"on-policy ratio: step means within {worst:.6f} of 1 (<= {tol}), largest {max(maxima):.6f} (<= {largest})")
EOF
  [ "${PIPESTATUS[0]}" = 0 ] || exit 1
}

phase_hf_pipeline() {
  run_opd hf --set actor.engine=hf --set actor.engine.device=cuda --set teacher.engine=hf \
    --set teacher.engine.device=cuda --set actor.temperature=0.7 --set learner.lr=1e-12
  check_history "$WORKDIR/hf/learner/history.jsonl" "$RATIO_MEAN_TOL" "$RATIO_MAX"
}

# A server in its own process group, healthy within 200 s. Small on purpose: 0.2 of the GPU each (both
# servers and nothing else by then), CUDA graphs captured up to batch 16 only (capture is most of a tiny
# model's start-up).
start_sglang() {  # name model port extra-args...
  local name=$1 model=$2 port=$3
  shift 3
  local log="$WORKDIR/logs/$name-sglang.log" extra=()
  read -r -a extra <<<"${OPD_SGLANG_ARGS:-}"
  SGLANG_RETURN_ORIGINAL_LOGPROB=false setsid "$SGLANG_PY" -m sglang.launch_server --model-path "$model" \
    --host 127.0.0.1 --port "$port" --mem-fraction-static 0.2 --cuda-graph-max-bs 16 "$@" "${extra[@]}" >"$log" 2>&1 &
  local pid=$!
  GROUPS_+=("$pid")
  echo "    $name server: pid $pid, port $port, log $log"
  "$PY" - "http://127.0.0.1:$port/health" "$pid" 200 <<'EOF' || { tail -n 40 "$log" >&2; die "the $name server did not become healthy (log: $log)"; }
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
    time.sleep(1)
sys.exit(f"no answer after {timeout:.0f}s")
EOF
}

phase_sglang_student() {
  STUDENT_PORT=$(free_port)
  start_sglang student "$ASSETS/student" "$STUDENT_PORT" --enable-deterministic-inference
}

phase_sglang_teacher() {
  TEACHER_PORT=$(free_port)
  start_sglang teacher "$ASSETS/teacher" "$TEACHER_PORT"
}

phase_sglang_pipeline() {
  run_opd sglang --set actor.engine=sglang --set actor.engine.url="http://127.0.0.1:$STUDENT_PORT" \
    --set teacher.engine=sglang --set teacher.engine.url="http://127.0.0.1:$TEACHER_PORT"
  check_history "$WORKDIR/sglang/learner/history.jsonl" -
}

phase_sglang_live() {
  local log="$WORKDIR/logs/sglang-live.log" tests=(tests/integration/test_sglang_live.py)
  [ ! -f tests/integration/test_sglang_live_more.py ] || tests+=(tests/integration/test_sglang_live_more.py)
  OPD_SGLANG_URL="http://127.0.0.1:$STUDENT_PORT" OPD_SGLANG_TEACHER_URL="http://127.0.0.1:$TEACHER_PORT" \
    OPD_SGLANG_DETERMINISTIC=1 timeout 150 "$PY" -m pytest -o addopts= -p no:cacheprovider -q -rs \
    -m sglang "${tests[@]}" >"$log" 2>&1 || { tail -n 40 "$log" >&2; die "live SGLang tests failed (log: $log)"; }
  tail -n 1 "$log" | sed 's/^/    /'
  if tail -n 1 "$log" | grep -q skipped; then
    grep SKIP "$log" >&2 || true
    die "live SGLang tests were skipped (log: $log)"
  fi
}

[ "$DRY_RUN" = 0 ] || echo "gpu-smoke: dry run: nothing is started, installed or written (budget ${TIMEOUT_S}s when run)"
i=0
for phase in "${PHASES[@]}"; do
  i=$((i + 1))
  run_phase "$phase" "$i"
done
if [ "$DRY_RUN" = 1 ]; then
  echo "gpu-smoke: dry run done: ${#PHASES[@]} phases, ${#SKIP[@]} skipped"
  exit 0
fi
summary
SUMMARY_SHOWN=1
skipped=0
for phase in "${PHASES[@]}"; do [ -z "${SKIP[$phase]:-}" ] || skipped=$((skipped + 1)); done
if [ "$skipped" = 0 ]; then
  echo "gpu-smoke: ok, all ${#PHASES[@]} phases"
else
  echo "gpu-smoke: ok, $((${#PHASES[@]} - skipped)) of ${#PHASES[@]} phases ($skipped skipped, reasons above)"
fi
