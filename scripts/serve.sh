#!/usr/bin/env bash
# Runs the Session Manager with its embedded defaults (a managed livekit-server on 127.0.0.1:7880,
# the API on 127.0.0.1:8080, SQLite state under var/). Extra arguments go to `session-manager`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/session-manager "$@"
