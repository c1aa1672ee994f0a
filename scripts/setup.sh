#!/usr/bin/env bash
# One-time (idempotent) set-up: Java 17 for TorchServe, .venv with the project and its pinned dependencies.
#
#   scripts/setup.sh            # the project, editable, with every role's dependencies (pyproject.toml [dev])
#   scripts/setup.sh --browser  # also headless Chromium + chromedriver for the browser test
#
# As root on Debian/Ubuntu it installs missing system packages with apt-get; otherwise it stops
# and prints the exact command to run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
want_browser=0
[ "${1:-}" = "--browser" ] && want_browser=1
say() { printf '[setup] %s\n' "$*"; }

apt_packages=()
java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
if ! command -v java >/dev/null || [ "$(java_major)" -lt 17 ]; then
  apt_packages+=(openjdk-17-jre-headless)
fi
if [ "$want_browser" = 1 ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
  apt_packages+=(chromium chromium-driver)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${apt_packages[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  else
    echo "error: missing system packages: ${apt_packages[*]}" >&2
    echo "run:   sudo apt-get update && sudo apt-get install -y ${apt_packages[*]}" >&2
    exit 1
  fi
fi
say "java: $(java -version 2>&1 | head -1)"

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $(python3 --version)"
  python3 -m venv .venv
fi
stamp=.venv/.pyproject.sha256
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing the project and its pinned dependencies into .venv (first time: several minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
  echo "$want" > "$stamp"
else
  say ".venv is up to date"
fi
