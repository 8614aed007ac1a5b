"""The package outside a clone: where livekit-server is found, `session-manager install-livekit`
(with a fake `go`), the lock, the daemon without the realtime SDK, and the container files kept
in step with the bootstrap."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from session_manager.api.auth import ROUTE_SCOPES
from session_manager.cli import main
from session_manager.config import SettingsError, load_settings
from session_manager.livekit import install, server
from session_manager.livekit.install import LIVEKIT_MODULE, LIVEKIT_TAG, cached_binary
from session_manager.livekit.server import LiveKitServerError, find_binary

ROOT = Path(__file__).resolve().parents[2]


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# --- where serve finds livekit-server ---


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An empty per-user cache, no clone binary, and a PATH of one empty folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    (tmp_path / "path").mkdir()
    monkeypatch.setattr(server, "BUNDLED_BINARY", tmp_path / "clone" / ".cache/bin/livekit-server")
    return {
        "cache": tmp_path / "cache/session-manager/livekit-server" / LIVEKIT_TAG / "livekit-server",
        "clone": tmp_path / "clone/.cache/bin/livekit-server",
        "path": tmp_path / "path/livekit-server",
    }


def test_without_any_livekit_server_the_error_says_how_to_get_one(places: dict[str, Path]) -> None:
    with pytest.raises(LiveKitServerError) as failure:
        find_binary(None)
    message = str(failure.value)
    assert "session-manager install-livekit" in message
    assert str(places["cache"].parent) in message
    assert "LIVEKIT_URL" in message


def test_the_pinned_builds_come_before_path(places: dict[str, Path]) -> None:
    executable(places["path"], "#!/bin/sh\n")
    assert find_binary(None) == str(places["path"])
    executable(places["clone"], "#!/bin/sh\n")
    assert find_binary(None) == str(places["clone"])
    executable(places["cache"], "#!/bin/sh\n")
    assert find_binary(None) == str(places["cache"])
    configured = executable(places["path"].parent / "mine", "#!/bin/sh\n")
    assert find_binary(str(configured)) == str(configured)


def test_the_cache_follows_xdg_cache_home_or_home(monkeypatch: pytest.MonkeyPatch) -> None:
    home = {"HOME": "/home/op"}
    assert cached_binary(environ=home) == Path(
        f"/home/op/.cache/session-manager/livekit-server/{LIVEKIT_TAG}/livekit-server"
    )
    # The XDG spec: a relative XDG_CACHE_HOME is ignored.
    assert cached_binary(environ={**home, "XDG_CACHE_HOME": "rel"}) == cached_binary(environ=home)
    assert cached_binary("v9", {**home, "XDG_CACHE_HOME": "/c"}) == Path(
        "/c/session-manager/livekit-server/v9/livekit-server"
    )


# --- session-manager install-livekit, with a fake go ---

FAKE_GO = """#!/bin/sh
# A stand-in for `go install`: records how it was called, then acts as $FAKE_GO_MODE says.
PATH="$PATH:/usr/bin:/bin"  # the test's PATH holds only this script
echo "$* GOBIN=$GOBIN GOFLAGS=$GOFLAGS" >> "$FAKE_GO_LOG"
case "$FAKE_GO_MODE" in
  fail) echo "go: build failed" >&2; exit 3 ;;
  nothing) exit 0 ;;
  hang) sleep 60 & echo $! > "$FAKE_GO_LOG.sleep"; wait; exit 0 ;;
esac
printf '#!/bin/sh\\necho "livekit-server version 1.13.5"\\n' > "$GOBIN/server"
chmod +x "$GOBIN/server"
"""


@pytest.fixture
def fake_go(places: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`go` on PATH is the script above; returns its call log."""
    executable(tmp_path / "path" / "go", FAKE_GO)
    log = tmp_path / "go.log"
    monkeypatch.setenv("FAKE_GO_LOG", str(log))
    monkeypatch.setenv("FAKE_GO_MODE", "build")
    return log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_install_livekit_builds_the_pinned_tag_into_the_cache(
    fake_go: Path, places: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["install-livekit"]) == 0
    out, err = capfd.readouterr()
    target = places["cache"]
    assert out.strip() == str(target)
    assert "livekit-server version 1.13.5" in err
    assert subprocess.run([target, "--version"], capture_output=True, text=True).stdout.strip() == (
        "livekit-server version 1.13.5"
    )
    [call] = calls(fake_go)
    assert call.startswith(f"install {LIVEKIT_MODULE}@{LIVEKIT_TAG} ")
    assert "-trimpath" in call
    # GOBIN was a temporary folder beside the cache (one filesystem: the move is a rename),
    # and it is gone.
    gobin = Path(re.search(r"GOBIN=(\S+)", call)[1])  # type: ignore[index]
    assert gobin.parent == target.parent.parent
    assert not gobin.exists()
    assert sorted(p.name for p in target.parent.parent.iterdir()) == [LIVEKIT_TAG]
    # serve now finds it there.
    assert find_binary(None) == str(target)


def test_install_livekit_keeps_what_is_cached_unless_forced(
    fake_go: Path, places: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["install-livekit"]) == 0
    assert main(["install-livekit"]) == 0
    out, err = capfd.readouterr()
    assert len(calls(fake_go)) == 1
    assert "already in the cache" in err
    assert out.split() == [str(places["cache"])] * 2
    assert main(["install-livekit", "--force"]) == 0
    assert len(calls(fake_go)) == 2


def test_install_livekit_another_tag_says_how_to_use_it(
    fake_go: Path, places: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["install-livekit", "--tag", "v1.9.0"]) == 0
    out, err = capfd.readouterr()
    assert out.strip().endswith("/livekit-server/v1.9.0/livekit-server")
    assert f"serve looks for {LIVEKIT_TAG}" in err
    assert "@v1.9.0 " in calls(fake_go)[0]
    with pytest.raises(LiveKitServerError):  # not the pinned one: serve does not pick it
        find_binary(None)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("fail", "go install failed with exit code 3"),
        ("nothing", "go install finished but left no server in GOBIN"),
    ],
)
def test_a_failed_build_leaves_the_cache_empty(
    mode: str,
    expected: str,
    fake_go: Path,
    places: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FAKE_GO_MODE", mode)
    assert main(["install-livekit"]) == 1
    out, err = capfd.readouterr()
    assert out == ""
    assert f"install-livekit: {expected}" in err
    assert not places["cache"].exists()
    assert list(places["cache"].parent.parent.iterdir()) == [places["cache"].parent]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped


def test_a_build_past_its_timeout_is_stopped_with_everything_it_started(
    fake_go: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_GO_MODE", "hang")
    assert main(["install-livekit", "--timeout", "0.5"]) == 1
    assert "did not finish within 0.5s" in capfd.readouterr().err
    sleeper = int(Path(f"{fake_go}.sleep").read_text())
    assert not _running(sleeper)


def test_install_livekit_without_go_says_so(
    places: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["install-livekit"]) == 1
    err = capfd.readouterr().err
    assert "Go is required to build livekit-server" in err
    assert "https://go.dev/dl/" in err


@pytest.mark.parametrize("tag", ["../escape", "-x", "v1 2", "v" * 101])
def test_install_livekit_refuses_a_tag_that_is_not_a_version(
    tag: str, fake_go: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["install-livekit", f"--tag={tag}"]) == 1
    assert "invalid tag" in capfd.readouterr().err
    assert calls(fake_go) == []


def test_install_livekit_help_names_the_cache(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["install-livekit", "--help"])
    assert done.value.code == 0
    out = capfd.readouterr().out
    assert LIVEKIT_TAG in out and "--force" in out and "--tag" in out


# --- one LiveKit tag, one lock: the bootstrap, the script and the image agree ---


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped), by stage;
    stage 0 holds what comes before the first FROM."""
    joined = re.sub(r"\\\n\s*", " ", re.sub(r"(?m)^\s*#.*\n", "", dockerfile()))
    found: list[list[tuple[str, str]]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        if keyword == "FROM":
            found.append([])
        found[-1].append((keyword, rest))
    return found


def final_stage(keyword: str) -> list[str]:
    return [rest for k, rest in stages()[-1] if k == keyword]


def test_the_livekit_tag_is_the_same_in_the_script_the_image_and_the_package() -> None:
    script = (ROOT / "scripts/install-livekit.sh").read_text()
    [script_tag] = re.findall(r'LIVEKIT_TAG="\$\{LIVEKIT_TAG:-([^}]+)\}"', script)
    [image_tag] = [rest.split("=", 1)[1] for k, rest in stages()[0] if k == "ARG"]
    assert script_tag == image_tag == LIVEKIT_TAG
    assert f'"{LIVEKIT_MODULE}@$LIVEKIT_TAG"' in script
    assert f'"{LIVEKIT_MODULE}@${{LIVEKIT_TAG}}"' in dockerfile()
    assert install.LIVEKIT_MODULE == "github.com/livekit/livekit-server/cmd/server"


def _lock_extras() -> set[str]:
    return set(re.findall(r"--extra (\w+)", (ROOT / "scripts/lock.sh").read_text()))


def test_the_image_installs_from_the_lock_ci_installs_from() -> None:
    bootstrap = (ROOT / "scripts/bootstrap.sh").read_text()
    assert "pip install --quiet -r requirements.lock" in bootstrap
    assert "pip install --quiet --no-deps -e ." in bootstrap
    # The lock holds every extra pyproject declares; the image installs the package with the
    # extras it names (none: the daemon needs neither the SDK nor the dev tools), constrained
    # by that same lock, so the image runs the versions CI tested.
    import tomllib

    declared = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    assert _lock_extras() == declared == {"dev", "sdk"}
    [install_line] = [run for run in final_stage("RUN") if "pip install" in run]
    assert "--constraint /tmp/requirements.lock" in install_line
    [wheel] = re.findall(r"\S*session_manager-\*\.whl(?:\[[^\]]*\])?", install_line)
    image_extras = set(re.findall(r"\[([^\]]*)\]", wheel)[0].split(",")) if "[" in wheel else set()
    assert image_extras == set()
    assert image_extras <= _lock_extras()
    # The same Python minor version as the lock was resolved for.
    [lock_python] = re.findall(r"--python-version (\S+)", (ROOT / "scripts/lock.sh").read_text())
    assert final_stage("FROM") == [f"python:{lock_python}-slim"]


def test_the_image_runs_unprivileged_with_a_healthcheck_on_health() -> None:
    [user] = final_stage("USER")
    assert user not in ("root", "0")
    [healthcheck] = final_stage("HEALTHCHECK")
    assert "http://127.0.0.1:%s/health" in healthcheck
    assert "os.environ.get('SESSION_MANAGER_PORT', '8080')" in healthcheck
    assert "/health" in {path for _, path in ROUTE_SCOPES}
    assert "--from=livekit /out/livekit-server /usr/local/bin/livekit-server" in final_stage("COPY")
    assert _image_env()["SESSION_MANAGER_HOST"] == "0.0.0.0"


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", value, text)


def _image_env() -> dict[str, str]:
    [block] = final_stage("ENV")
    return dict(re.findall(r"(\w+)=(\S+)", block))


def test_compose_runs_the_manager_on_redis_with_its_livekit() -> None:
    env = {
        "LIVEKIT_API_KEY": "session-manager",
        "LIVEKIT_API_SECRET": "s" * 64,
        "SESSION_MANAGER_API_KEYS": "k" * 32 + " admin",
    }
    compose: dict[str, Any] = yaml.safe_load(_interpolate((ROOT / "compose.yaml").read_text(), env))
    services = compose["services"]
    assert set(services) == {"manager", "livekit", "redis"}
    manager, livekit = services["manager"], services["livekit"]
    assert manager["build"] == livekit["build"] == "."
    assert livekit["entrypoint"] == ["livekit-server"]
    # The settings the manager starts with in its container are accepted as they are.
    settings = load_settings(environ={**_image_env(), **manager["environment"]})
    assert settings.store == "redis"
    assert settings.livekit_url == "ws://livekit:7880"
    assert settings.host == "0.0.0.0"
    # LiveKit signs its webhooks with the manager's key and posts them to its port and route.
    lk_config = yaml.safe_load(livekit["environment"]["LIVEKIT_CONFIG"])
    assert lk_config["webhook"]["api_key"] == settings.livekit_api_key
    assert lk_config["webhook"]["urls"] == [f"http://manager:{settings.port}/livekit/webhook"]
    assert ("POST", "/livekit/webhook") in ROUTE_SCOPES
    assert lk_config["redis"]["address"] == "redis:6379"
    assert livekit["environment"]["LIVEKIT_KEYS"] == f"session-manager: {'s' * 64}"
    # Without API keys compose refuses to start it, as the manager would on 0.0.0.0.
    with pytest.raises(KeyError, match="SESSION_MANAGER_API_KEYS"):
        _interpolate((ROOT / "compose.yaml").read_text(), {**env, "SESSION_MANAGER_API_KEYS": ""})
    without_keys = {
        k: v for k, v in manager["environment"].items() if k != "SESSION_MANAGER_API_KEYS"
    }
    with pytest.raises(SettingsError, match=r"api_keys: required when host 0\.0\.0\.0"):
        load_settings(environ={**_image_env(), **without_keys})


def test_the_build_context_holds_the_sources_and_the_lock_only() -> None:
    lines = (ROOT / ".dockerignore").read_text().split("\n")
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines
    copies = [rest.split()[:-1] for stage in stages() for k, rest in stage if k == "COPY"]
    sources = {name for names in copies if not names[0].startswith("--from") for name in names}
    assert sources <= allowed
    assert sources == {"pyproject.toml", "README.md", "session_manager", "requirements.lock"}


# --- the lock ---


def check_lock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/check_lock.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_lock_pins_every_declared_dependency() -> None:
    done = check_lock()
    assert (done.returncode, done.stderr) == (0, "")


def test_a_stale_lock_is_named_with_the_command_that_refreshes_it(tmp_path: Path) -> None:
    lock = (ROOT / "requirements.lock").read_text()
    missing = tmp_path / "missing.lock"
    missing.write_text(re.sub(r"(?m)^yarl==.*\n", "", lock))
    done = check_lock("--lock", str(missing))
    assert done.returncode == 1
    assert "yarl: declared (yarl>=1.17) but not in the lock" in done.stderr
    assert "run bash scripts/lock.sh" in done.stderr
    old = tmp_path / "old.lock"
    old.write_text(re.sub(r"(?m)^aiohttp==\S+", "aiohttp==3.9.5", lock))
    done = check_lock("--lock", str(old))
    assert "aiohttp: the lock pins 3.9.5, declared aiohttp>=3.14" in done.stderr


# --- the daemon without the realtime SDK ---

WITHOUT_RTC = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    class NotInstalled:
        # As if the `sdk` extra were not installed: no livekit.rtc, no numpy.
        def find_spec(self, name, path=None, target=None):
            if name in ("livekit.rtc", "numpy") or name.startswith(("livekit.rtc.", "numpy.")):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NotInstalled())
    import session_manager
    from session_manager.api.app import create_app
    from session_manager.config import Settings

    modules = [m.name for m in pkgutil.walk_packages(session_manager.__path__, "session_manager.")]
    # All but the SDK's, and __main__ (importing it runs the manager).
    daemon = [
        m for m in modules
        if not m.startswith("session_manager.sdk") and m != "session_manager.__main__"
    ]
    for name in daemon:
        importlib.import_module(name)
    create_app(Settings(), api_port=8080)
    print(len(daemon), sorted(m for m in sys.modules if m.startswith(("livekit.rtc", "numpy"))))
    try:
        import session_manager.sdk
    except ImportError as exc:
        print(exc)
    """
)


def test_the_daemon_runs_without_the_realtime_sdk() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RTC],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    imported, sdk_error = done.stdout.splitlines()
    count, loaded = imported.split(" ", 1)
    assert int(count) > 50  # every module but the SDK's
    assert loaded == "[]"
    assert sdk_error == (
        "session_manager.sdk needs the livekit realtime SDK: pip install 'session-manager[sdk]'"
    )
