#!/usr/bin/env bash
# Writes requirements.lock: every package of the project, its `dev` and `sdk` extras and all that
# they pull, pinned to one version, for Python 3.11 on any platform (markers say where a pin only
# applies to some). scripts/bootstrap.sh (so CI) installs exactly these; the Dockerfile uses them
# as constraints. Run it after changing a dependency in pyproject.toml: pins already in the lock
# are kept where they still fit. To move everything to the newest versions that fit:
#   bash scripts/lock.sh --upgrade            (or --upgrade-package NAME for one)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
uv="${UV:-.venv/bin/uv}"
if [[ ! -x "$uv" ]] && ! command -v "$uv" >/dev/null 2>&1; then
  echo "lock: uv not found (it is in the dev extra: bash scripts/bootstrap.sh installs it)" >&2
  exit 1
fi
"$uv" pip compile pyproject.toml \
  --extra dev --extra sdk \
  --universal --python-version 3.11 \
  --no-emit-package session-manager \
  --custom-compile-command "bash scripts/lock.sh" \
  --output-file requirements.lock \
  --quiet "$@"
