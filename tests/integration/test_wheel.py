"""The package without the clone: a wheel built from the sources alone, installed with pip into a
fresh virtualenv, runs `session-manager serve` from another folder with the livekit-server it
finds on PATH, and a session can be made.

Nothing here reaches a registry (the test namespace has no route out): the wheel is built and
installed from .cache/wheelhouse, the runtime wheels at the lock's versions that
scripts/bootstrap.sh downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from session_manager.livekit.install import LIVEKIT_TAG
from session_manager.livekit.server import BUNDLED_BINARY
from tests.conftest import free_port, require_netns

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
# What the Dockerfile's wheel stage copies too: the package must build from these alone.
SOURCES = ("pyproject.toml", "README.md", "session_manager")
STEP = 300  # seconds for one build or install step, on a loaded machine


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path

    @property
    def command(self) -> str:
        return str(self.venv / "bin" / "session-manager")


def run(*command: str | Path, **options: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=STEP, **options
    )
    assert done.returncode == 0, f"{command}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    if not (WHEELHOUSE / ".complete").exists():
        pytest.fail(f"{WHEELHOUSE} is missing: run scripts/bootstrap.sh")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    offline = ("--offline", "--no-index", "--find-links", WHEELHOUSE)
    # uv builds it (in a third of pip's time), pip installs it, as an operator would.
    uv = Path(sys.executable).parent / "uv"
    run(uv, "build", "--wheel", "--quiet", "--python", sys.executable, *offline,
        "--out-dir", work / "dist", source)  # fmt: skip
    [wheel] = (work / "dist").glob("session_manager-*.whl")
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    run(sys.executable, "-m", "pip", "--python", venv / "bin/python", "install", "--quiet",
        "--no-index", "--find-links", WHEELHOUSE, wheel)  # fmt: skip
    return Installed(venv, wheel)


def test_the_wheel_installs_the_daemon_without_the_realtime_sdk(installed: Installed) -> None:
    probe = (
        "import importlib.util, session_manager; print(session_manager.__file__); "
        "print(importlib.util.find_spec('numpy'), importlib.util.find_spec('livekit.rtc'))"
    )
    where, missing = run(installed.venv / "bin/python", "-c", probe, cwd="/").stdout.splitlines()
    assert Path(where).is_relative_to(installed.venv)  # the wheel's copy, not the clone's
    assert missing == "None None"  # the `sdk` extra was not asked for, so no numpy either


def test_the_installed_command_and_its_subcommands_answer_help(installed: Installed) -> None:
    main = run(installed.command, "--help", cwd="/").stdout
    assert "install-livekit" in main and "--livekit-server-binary" in main
    install = run(installed.command, "install-livekit", "--help", cwd="/").stdout
    assert LIVEKIT_TAG in install and "--force" in install
    sessions = run(installed.command, "sessions", "--help", cwd="/").stdout
    assert "list" in sessions


def _get(url: str, *, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_for_health(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve exited with {process.returncode}:\n{log.read_text()}"
        try:
            if _get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"serve never answered {url}:\n{log.read_text()}")


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def path_with_livekit(tmp_path: Path) -> Iterator[Path]:
    """A folder for PATH holding only a livekit-server (the clone's build, by symlink)."""
    if not os.access(BUNDLED_BINARY, os.X_OK):
        pytest.fail(f"{BUNDLED_BINARY} is missing: run scripts/bootstrap.sh")
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "livekit-server").symlink_to(BUNDLED_BINARY)
    yield folder


def test_serve_runs_from_anywhere_with_livekit_from_path(
    installed: Installed, path_with_livekit: Path, tmp_path: Path
) -> None:
    require_netns()
    port, livekit_port = free_port(), free_port()
    elsewhere = tmp_path / "elsewhere"  # not the clone: no config/, no .cache/
    elsewhere.mkdir()
    env = {
        # PATH: the livekit-server and the virtualenv, nothing else; an empty per-user cache.
        "PATH": os.pathsep.join([str(path_with_livekit), str(installed.venv / "bin")]),
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "LANG": "C.UTF-8",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [installed.command, "serve", "--port", str(port),
             "--livekit-port", str(livekit_port),
             "--livekit-rtc-tcp-port", str(free_port()),
             "--livekit-rtc-udp-port", str(free_port(socket.SOCK_DGRAM))],
            cwd=elsewhere, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_health(f"{base}/health", process, log)
        status, created = _get(
            f"{base}/api/v1/sessions",
            body={"user_identity": "wheel-user", "required_services": []},
        )
        assert (status, created["status"]) == (200, "Ready"), created
        assert created["livekit_url"] == f"ws://127.0.0.1:{livekit_port}"
        status, view = _get(f"{base}/api/v1/sessions/{created['session_id']}")
        assert (status, view["status"], view["user_identity"]) == (200, "Ready", "wheel-user")
        assert _answers(livekit_port)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise
    text = log.read_text()
    assert code == 0, text
    assert f"binary={path_with_livekit / 'livekit-server'}" in text  # found on PATH
    assert not _answers(livekit_port)  # its livekit-server stopped with it
    assert (elsewhere / "var").is_dir()  # state where it was started, not in the clone
