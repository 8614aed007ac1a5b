#!/usr/bin/env bash
# Builds livekit-server at a pinned tag from the Go module proxy into .cache/bin/.
# Later runs find the binary there and skip the build (a cold build takes about 3 minutes).
# For a clone (the tests run this one); an installed package has `session-manager
# install-livekit`, which builds the same tag into the per-user cache. The default tag below must
# equal LIVEKIT_TAG in session_manager/livekit/install.py and the Dockerfile's (a unit test checks).
set -euo pipefail
LIVEKIT_TAG="${LIVEKIT_TAG:-v1.13.5}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="$root/.cache/bin"
target="$bin_dir/livekit-server"
stamp="$bin_dir/livekit-server.version"

if [[ -x "$target" && -f "$stamp" && "$(cat "$stamp")" == "$LIVEKIT_TAG" ]]; then
  exit 0
fi
command -v go >/dev/null || { echo "install-livekit: Go is required to build livekit-server" >&2; exit 1; }
mkdir -p "$bin_dir"
echo "install-livekit: building livekit-server $LIVEKIT_TAG (takes a few minutes the first time)" >&2
GOBIN="$bin_dir" GOFLAGS="${GOFLAGS:-} -trimpath" go install "github.com/livekit/livekit-server/cmd/server@$LIVEKIT_TAG"
mv -f "$bin_dir/server" "$target"
echo "$LIVEKIT_TAG" > "$stamp"
