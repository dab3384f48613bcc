#!/usr/bin/env bash
# One command: set up (first time only), lint, and run the full test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
OPD_WITH_TEST_TOOLS=1 bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
