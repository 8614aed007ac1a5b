"""Whether this process runs inside the private network namespace of scripts/netns-run.sh.

The environment variable that script exports says so, but anyone can set it by hand; the
interfaces this process sees (`/proc/self/net/dev`, per network namespace, unlike /sys/class/net)
cannot lie: inside, only loopback and the script's veth pair exist. Tests that start WebRTC, or
that kill the processes they find at the end of a run, require both."""

from __future__ import annotations

import os
from pathlib import Path

NETNS_ENV = "SESSION_MANAGER_NETNS"
PRIVATE_INTERFACES = frozenset({"lo", "sm-veth0", "sm-veth1"})


def visible_interfaces() -> set[str]:
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return {line.split(":", 1)[0].strip() for line in lines if ":" in line}


def in_private_netns() -> bool:
    return os.environ.get(NETNS_ENV) == "1" and visible_interfaces() <= PRIVATE_INTERFACES
