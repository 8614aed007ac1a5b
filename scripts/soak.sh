#!/usr/bin/env bash
# Runs the soak (scripts/soak.py: concurrent creators of sessions whose pong services really join
# and leave LiveKit rooms; 5xx, leaked rooms and the manager's RSS reported) after installing what
# it needs, inside a private network namespace (scripts/netns-run.sh, needs root): the services'
# WebRTC needs its veth pair. Extra arguments go to soak.py (--help lists them).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec bash scripts/netns-run.sh .venv/bin/python scripts/soak.py "$@"
