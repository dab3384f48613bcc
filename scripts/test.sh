#!/usr/bin/env bash
# One command: set up (first time only), lint, and run the full test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# The suite writes a few GB (measured here: the venv 1.9 GB, the real pretrained pair 0.7 GB built twice under the
# temp dir, Docker's images 1.9 GB and up to 4 GB of its build cache; 8 GB is that, rounded up): say so up front
# when the disk is short, rather than 40 minutes later as "No space left".
for dir in . "${TMPDIR:-/tmp}"; do
  free_gb=$(df -Pk "$dir" | awk 'NR == 2 { print int($4 / 1048576) }')
  if [ "${free_gb:-0}" -lt 8 ]; then
    echo "test.sh: WARNING: only ${free_gb} GB free under $dir; the suite needs about 8 GB (tests fail with" \
         "'No space left on device' below that)" >&2
  fi
done
OPD_WITH_TEST_TOOLS=1 bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
