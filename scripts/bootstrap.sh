#!/usr/bin/env bash
# Makes a fresh machine ready: a project virtualenv with the package and its dev tools, the pinned
# livekit-server, iproute2 for the network-namespace tests, and redis-server for the Redis store's
# tests (they start their own server; the system service is not started). Idempotent and quiet
# when done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"

if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
stamp=.venv/.installed
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[dev]'
  touch "$stamp"
fi

bash scripts/install-livekit.sh

if ! command -v ip >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
fi

if ! command -v redis-server >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
