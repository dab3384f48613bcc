#!/usr/bin/env bash
# One command: set up (first time only) and run the CPU demo pipeline. Extra args go to `opd demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/opd demo "$@"
