#!/usr/bin/env bash
# Makes a fresh machine ready: a project virtualenv with the package and its dev tools at the
# versions of requirements.lock, the runtime wheels of the wheel test, the pinned livekit-server,
# iproute2 for the network-namespace tests, redis-server for the Redis store's tests (they start
# their own server; the system service is not started), and chromium for the console's tests.
# Idempotent and quiet when done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"

if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
stamp=.venv/.installed
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || requirements.lock -nt "$stamp" ]]; then
  .venv/bin/pip install --quiet --upgrade pip
  # Exactly the versions of the lock (the dev and sdk extras and all they pull: scripts/lock.sh),
  # then the project itself, whose dependencies the lock already holds.
  .venv/bin/pip install --quiet -r requirements.lock
  .venv/bin/pip install --quiet --no-deps -e .
  # A dependency added to pyproject.toml but not yet to the lock (`bash scripts/lock.sh`) is named
  # here and installed unpinned, so work goes on; tests/unit/test_packaging.py fails until the
  # lock has it.
  if ! .venv/bin/python scripts/check_lock.py; then
    .venv/bin/pip install --quiet -e '.[dev]'
  fi
  touch "$stamp"
fi

# The wheels a package built from this tree needs at run time (and setuptools to build it), at
# the lock's versions: tests/integration/test_wheel.py installs it into a fresh virtualenv from
# these alone, inside the test namespace that reaches no registry.
wheelhouse=.cache/wheelhouse
if [[ ! -f "$wheelhouse/.complete" || requirements.lock -nt "$wheelhouse/.complete" ]]; then
  rm -rf "$wheelhouse"
  mkdir -p "$wheelhouse"
  .venv/bin/python scripts/check_lock.py --runtime > "$wheelhouse/runtime.txt"
  .venv/bin/pip download --quiet --only-binary=:all: --dest "$wheelhouse" \
    --constraint requirements.lock -r "$wheelhouse/runtime.txt" "setuptools>=68"
  touch "$wheelhouse/.complete"
fi

bash scripts/install-livekit.sh

if ! command -v ip >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
fi

if ! command -v redis-server >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi

# Debian's chromium, for the console's browser tests (Playwright drives it; it downloads none).
if [[ ! -x /usr/bin/chromium ]] && [[ "$(id -u)" == 0 ]]; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
