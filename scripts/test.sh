#!/usr/bin/env bash
# Runs the whole test suite (unit, integration on a real livekit-server, end to end with WebRTC)
# after installing whatever it needs, inside a private network namespace (scripts/netns-run.sh).
# Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
# The livekit realtime SDK's native side may print a line of its own at interpreter exit, after
# pytest's summary; it says nothing about the tests, so it is kept out of the output's last line.
# (-a: output that is not UTF-8 is still text, not a "binary file" that hides the summary.)
bash scripts/netns-run.sh .venv/bin/python -m pytest "$@" 2>&1 | grep -a -v --line-buffered '^livekit_ffi::'
