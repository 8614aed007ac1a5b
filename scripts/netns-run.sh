#!/usr/bin/env bash
# Runs a command inside a fresh, private network and PID namespace with loopback and a veth pair
# whose two ends both stay inside (10.77.0.1/24 <-> 10.77.0.2/24). WebRTC ignores loopback candidates, so
# tests where media or data really flow need the veth; and nothing in here can reach any other
# network, which keeps test traffic off this machine's own interfaces by construction.
set -euo pipefail
if [[ "${SESSION_MANAGER_NETNS:-}" == 1 ]]; then
  exec "$@"  # already inside one
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "netns-run: creating a network namespace needs root (unshare -n)" >&2
  exit 1
fi
# --pid --fork --mount-proc: a PID namespace too, so every process a run starts dies with it,
# whether the run passed, failed or was killed. bash stays PID 1 (no exec) to reap orphans.
exec unshare --net --pid --fork --mount-proc -- bash -euo pipefail -c '
  ip link set lo up
  ip link add sm-veth0 type veth peer name sm-veth1
  ip addr add 10.77.0.1/24 dev sm-veth0
  ip addr add 10.77.0.2/24 dev sm-veth1
  ip link set sm-veth0 up
  ip link set sm-veth1 up
  export SESSION_MANAGER_NETNS=1
  "$@"
' netns-run "$@"
