#!/usr/bin/env bash
# Builds the folder an air-gapped GPU host needs for scripts/gpu-smoke.sh --wheels DIR: the project's
# wheel, every dependency of the project except torch (the host's CUDA torch is used), pytest for the
# live SGLang tests, and a redis-server binary. Small: no torch, no CUDA libraries, no SGLang (the
# SGLang server runs from its own interpreter or image, OPD_SGLANG_PYTHON).
#
# usage: scripts/gpu-wheels.sh [--dest DIR] [--python-version X.Y] [--platform TAG] [--redis-server PATH] [--dry-run]
#
#   --dest DIR            output folder (default dist/gpu-wheels; wheels already there are kept)
#   --python-version X.Y  the GPU host's Python (default: this interpreter's)
#   --platform TAG        a platform tag the GPU host takes (repeatable; default the x86_64 manylinux
#                         tags of glibc 2.28 and older: manylinux_2_28, _2_17, 2014, _2_5)
#   --redis-server PATH   the redis-server to carry (default: the one on PATH); it must run on the GPU
#                         host (same distribution and libc, or a static build)
#   --dry-run             print the requirements and commands, download nothing
#
# Then copy DIR and this repository to the GPU host and run
#   PYTHON=/path/to/python-with-cuda-torch scripts/gpu-smoke.sh --wheels DIR
# What the folder holds and why: docs/deploy.md, "Smoke test on a GPU host".
#
# environment:
#   PYTHON   interpreter that runs pip here (default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '/^# usage:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

PY=${PYTHON:-.venv/bin/python}
if [ -z "${PYTHON:-}" ] && [ ! -x "$PY" ]; then PY=python3; fi
DEST=dist/gpu-wheels
PYVER=""
PLATFORMS=()
REDIS=""
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --python-version) PYVER=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --platform) PLATFORMS+=("${2:-}"); shift 2 || { usage >&2; exit 2; } ;;
    --redis-server) REDIS=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-wheels: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
PYVER=${PYVER:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "gpu-wheels: --python-version must look like 3.12, not '$PYVER'" >&2; exit 2; }
REDIS=${REDIS:-$(command -v redis-server || true)}
if [ ${#PLATFORMS[@]} = 0 ]; then
  PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)
fi
PLATFORM_ARGS=()
for tag in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$tag"); done

# pyproject.toml's dependencies without torch, plus pytest: what the smoke check imports.
mapfile -t REQS < <("$PY" - <<'EOF'
import re
import tomllib

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    if re.match(r"torch\b", dep) is None:
        print(dep)
print("pytest>=8.0")
EOF
)

run() {
  echo "+ $*"
  [ "$DRY_RUN" = 1 ] || "$@"
}

echo "==> gpu-wheels: into $DEST for CPython $PYVER on ${PLATFORMS[*]}: the project, ${REQS[*]}"
run mkdir -p "$DEST/bin"
run "$PY" -m pip wheel --no-deps --wheel-dir "$DEST" .
run "$PY" -m pip download --dest "$DEST" --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORM_ARGS[@]}" "${REQS[@]}"
if [ -n "$REDIS" ]; then
  run cp "$REDIS" "$DEST/bin/redis-server"
else
  echo "gpu-wheels: warning: no redis-server here (apt-get install redis-server, or --redis-server PATH): the GPU host must have one" >&2
fi
if [ "$DRY_RUN" = 0 ]; then
  echo "==> gpu-wheels: $(find "$DEST" -type f | wc -l) files, $(du -sh "$DEST" | cut -f1) in $DEST"
  if [ -n "$REDIS" ] && command -v ldd >/dev/null 2>&1; then
    echo "    redis-server links: $(ldd "$DEST/bin/redis-server" 2>/dev/null | awk '{print $1}' | tr '\n' ' ')"
  fi
fi
