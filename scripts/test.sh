#!/usr/bin/env bash
# The whole test suite from a clean clone: set-up (Java, .venv, headless Chromium), lint, tests.
#
#   scripts/test.sh              # everything CI runs
#   scripts/test.sh -k serving   # extra arguments go to pytest
#
# Test artefacts (the browser screenshot) land in test-artifacts/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
started=$SECONDS
scripts/setup.sh --browser
echo "[test] ruff check + format check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "[test] pytest"
.venv/bin/python -m pytest "$@"
echo "[test] done in $((SECONDS - started))s"
