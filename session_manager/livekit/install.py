"""The pinned livekit-server, its per-user cache, and `session-manager install-livekit`.

`LIVEKIT_TAG` is the one version the manager is tested with; scripts/install-livekit.sh (a
clone's .cache/bin) and the Dockerfile build the same tag, and a unit test keeps all three equal.
`install` builds it from the Go module proxy (`go install`, as the script does) into
`${XDG_CACHE_HOME:-~/.cache}/session-manager/livekit-server/<tag>/livekit-server`, where
`find_binary` looks first when no binary is configured. Standard library only: the command must
run before anything else works.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LIVEKIT_TAG = "v1.13.5"
LIVEKIT_MODULE = "github.com/livekit/livekit-server/cmd/server"
BINARY_NAME = "livekit-server"
BUILD_TIMEOUT = 1800.0  # seconds for `go install`: a cold build takes ~3 minutes on 2 cores
VERSION_TIMEOUT = 15.0  # seconds for the built binary to print its version
# A module version or a query such as `latest`: one path segment, nothing a shell or Go reads
# as an option; its length bounded like any input.
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


class InstallError(Exception):
    """livekit-server could not be built or put in the cache; the message says what to do."""


@dataclass(frozen=True)
class Installed:
    path: Path
    built: bool  # False: it was in the cache already
    version: str  # what the binary says of itself, e.g. "livekit-server version 1.13.5"


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CACHE_HOME/session-manager/livekit-server`; the XDG spec ignores a relative
    XDG_CACHE_HOME, and so do we (~/.cache then)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME", "")
    if not base or not Path(base).is_absolute():
        home = env.get("HOME") or str(Path.home())
        base = str(Path(home) / ".cache")
    return Path(base) / "session-manager" / BINARY_NAME


def cached_binary(tag: str = LIVEKIT_TAG, environ: Mapping[str, str] | None = None) -> Path:
    return cache_root(environ) / tag / BINARY_NAME


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise InstallError(
            f"invalid tag {tag[:100]!r}: a version such as {LIVEKIT_TAG} (letters, digits, "
            "'.', '_', '+', '-'; at most 100 characters)"
        )
    return tag


def install(
    tag: str = LIVEKIT_TAG,
    *,
    force: bool = False,
    timeout: float = BUILD_TIMEOUT,
    environ: Mapping[str, str] | None = None,
) -> Installed:
    """Build `tag` with `go install` into a temporary GOBIN beside the cache, check that it runs,
    and rename it into place: a reader never sees half a binary, and two installs at once each
    rename a whole one. Go's output goes to our stderr."""
    env = dict(os.environ if environ is None else environ)
    target = cached_binary(check_tag(tag), env)
    if not force and os.access(target, os.X_OK):
        return Installed(target, built=False, version=_version(target))
    go = shutil.which("go", path=env.get("PATH"))
    if go is None:
        raise InstallError(
            "Go is required to build livekit-server (https://go.dev/dl/; livekit-server "
            f"{LIVEKIT_TAG} needs Go 1.26 or newer). Without Go: put a livekit-server on PATH, "
            "set livekit_server_binary, or use an external LiveKit (LIVEKIT_URL, "
            "LIVEKIT_API_KEY, LIVEKIT_API_SECRET)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # In the cache's own folder, so that the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent.parent) as gobin:
        env["GOBIN"] = gobin
        env["GOFLAGS"] = f"{env.get('GOFLAGS', '')} -trimpath".strip()
        _run_go([go, "install", f"{LIVEKIT_MODULE}@{tag}"], env, timeout)
        built = Path(gobin) / "server"  # go names the binary after the package folder
        if not built.is_file():
            raise InstallError(f"go install finished but left no {built.name} in GOBIN")
        built.chmod(0o755)
        version = _version(built)
        os.replace(built, target)
    return Installed(target, built=True, version=version)


def _run_go(command: list[str], env: dict[str, str], timeout: float) -> None:
    # Its own process group: a timeout or Ctrl-C stops the compilers go started, not only go.
    process = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=2, start_new_session=True
    )
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise InstallError(
            f"go install did not finish within {timeout:g}s (--timeout to allow more)"
        ) from None
    finally:
        if process.returncode is None:
            _kill_group(process)
    if code != 0:
        raise InstallError(f"go install failed with exit code {code} (its output is above)")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(VERSION_TIMEOUT)


def _version(binary: Path) -> str:
    try:
        done = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{binary} does not run: {exc}") from None
    if done.returncode != 0:
        raise InstallError(f"{binary} --version exited with code {done.returncode}")
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="session-manager install-livekit",
        description=(
            f"Build livekit-server {LIVEKIT_TAG} (the version this release is tested with) from "
            "the Go module proxy with `go install`, into the per-user cache where "
            "`session-manager serve` finds it. Needs Go; a cold build takes a few minutes."
        ),
        epilog=f"The cache: {cached_binary()} (XDG_CACHE_HOME moves it). Prints the binary's path.",
    )
    parser.add_argument(
        "--tag",
        default=LIVEKIT_TAG,
        help="another livekit-server version; serve uses it only when livekit_server_binary "
        "points at it [%(default)s]",
    )
    parser.add_argument("--force", action="store_true", help="build again even if cached")
    parser.add_argument(
        "--timeout", type=float, default=BUILD_TIMEOUT, help="seconds for the build [%(default)g]"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("install-livekit: --timeout must be positive", file=sys.stderr)
        return 2
    try:
        if args.force or not os.access(cached_binary(check_tag(args.tag)), os.X_OK):
            print(
                f"install-livekit: building livekit-server {args.tag} with go install "
                "(a few minutes the first time)",
                file=sys.stderr,
                flush=True,
            )
        result = install(args.tag, force=args.force, timeout=args.timeout)
    except InstallError as exc:
        print(f"install-livekit: {exc}", file=sys.stderr)
        return 1
    if not result.built:
        print("install-livekit: already in the cache (--force builds it again)", file=sys.stderr)
    print(f"install-livekit: {result.version} at {result.path}", file=sys.stderr)
    if args.tag != LIVEKIT_TAG:
        print(
            f"install-livekit: serve looks for {LIVEKIT_TAG}; to run this one set "
            f"livekit_server_binary = {result.path}",
            file=sys.stderr,
        )
    print(result.path)
    return 0
