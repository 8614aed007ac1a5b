#!/usr/bin/env bash
# Runs the whole test suite (unit, integration on a real livekit-server, end to end with WebRTC)
# after installing whatever it needs, inside a private network namespace (scripts/netns-run.sh).
# Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec bash scripts/netns-run.sh .venv/bin/python -m pytest "$@"
