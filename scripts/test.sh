#!/usr/bin/env bash
# Runs the whole test suite (unit, integration on a real livekit-server, end to end in a network
# namespace), after installing whatever it needs. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python -m pytest "$@"
