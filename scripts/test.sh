#!/usr/bin/env bash
# The whole test suite from a clean clone: set-up (Java, .venv, headless Chromium), lint, tests.
#
#   scripts/test.sh              # everything CI runs
#   scripts/test.sh --fast       # the fast lane: no TorchServe, no browser (pytest -m "not server and not browser")
#   scripts/test.sh -k serving   # extra arguments go to pytest (after --fast, if given)
#
# Test artefacts (the browser screenshot) land in test-artifacts/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
started=$SECONDS
setup_args=(--browser)
lane=()
if [ "${1:-}" = "--fast" ]; then
  shift
  setup_args=()  # no Chromium
  lane=(-m "not server and not browser")  # the markers are declared in pyproject.toml
fi
scripts/setup.sh "${setup_args[@]}"
echo "[test] ruff check + format check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "[test] pytest ${lane[*]}"
.venv/bin/python -m pytest "${lane[@]}" "$@"
echo "[test] done in $((SECONDS - started))s"
