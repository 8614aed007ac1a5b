#!/usr/bin/env bash
# Rebuilds the console's vendored files from scripts/console/package-lock.json: `npm ci` installs
# exactly what the lock pins (with its integrity hashes), and livekit-client's self-contained ES
# module build is copied into session_manager/api/console_assets/, with its licence.
# The copies are committed, so `pip install` alone serves the console; run this only to change
# the livekit-client version (edit scripts/console/package.json, then
# `npm install --package-lock-only` there, then this script).
# Needs node and npm; downloads from the npm registry only.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/scripts/console"
assets="$root/session_manager/api/console_assets"

cd "$build"
# --ignore-scripts: nothing from the registry runs here; the files are only copied.
timeout 600 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
package="$build/node_modules/livekit-client"
mkdir -p "$assets"
cp "$package/dist/livekit-client.esm.mjs" "$assets/livekit-client.esm.mjs"
cp "$package/LICENSE" "$assets/livekit-client.LICENSE"
version="$(node -p "require('$package/package.json').version")"
echo "console assets: livekit-client $version -> ${assets#"$root/"}"
