#!/usr/bin/env bash
# The whole test suite from a clean clone: set-up (Java, .venv, headless Chromium), lint, tests.
#
#   scripts/test.sh              # what CI runs: everything but the tests marked slow
#   scripts/test.sh --all        # everything, the slow tests too (second servers, real-data and benchmark runs)
#   scripts/test.sh --fast       # the fast lane: no TorchServe, no browser, no training, export or archive commands
#   scripts/test.sh -k serving   # extra arguments go to pytest (after --fast, if given)
#
# Test artefacts (the browser screenshot) land in test-artifacts/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
started=$SECONDS
setup_args=(--browser)
lane=(-m "not slow")  # the markers are declared in pyproject.toml
if [ "${1:-}" = "--fast" ]; then
  shift
  setup_args=()  # no Chromium
  lane=(-m "not server and not browser and not slow and not cli")
elif [ "${1:-}" = "--all" ]; then
  shift
  lane=()
fi
scripts/setup.sh "${setup_args[@]}"
echo "[test] ruff check + format check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "[test] pytest ${lane[*]}"
.venv/bin/python -m pytest "${lane[@]}" "$@"
echo "[test] done in $((SECONDS - started))s"
