"""A service configured the livekit-agents way: `SESSION_MANAGER_URL` and
`SESSION_MANAGER_API_KEY` from the environment, the flags of `run_service`, and their
precedence (flags > environment > code > the SDK's defaults). The last test runs a
`run_service` script as a real process against a fake manager."""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest
from aiohttp import web

from session_manager.sdk import (
    API_KEY_ENV,
    MANAGER_URL_ENV,
    JoinedSession,
    MicroserviceRunner,
    add_service_arguments,
    runner_options,
)
from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"sdk-cli-tests-signing-secret-32b").decode()


class Refused(Exception):
    """What argparse would print before exiting with status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Refused(message)


def parse(
    argv: list[str], environ: dict[str, str] | None = None, **code: Any
) -> argparse.Namespace:
    parser = Parser(prog="svc")
    add_service_arguments(parser, environ=environ or {}, **code)
    return parser.parse_args(argv)


# --- precedence ------------------------------------------------------------------------------


def test_without_flags_or_environment_the_codes_values_hold() -> None:
    args = parse(
        [],
        service_id="echo-1",
        port=8002,
        manager_url="http://manager:8080",
        trusted_livekit_urls=["ws://lk:7880"],
        max_sessions=4,
        log_level="warning",
    )

    assert runner_options(args) == {
        "host": "127.0.0.1",
        "port": 8002,
        "manager_url": "http://manager:8080",
        "advertise_url": None,
        "trusted_livekit_urls": ("ws://lk:7880",),
        "max_sessions": 4,
        "presence": True,
    }
    assert (args.service_id, args.log_level) == ("echo-1", "WARNING")


def test_the_sdks_defaults_fill_what_the_code_leaves_out() -> None:
    args = parse([], service_id="echo-1")

    assert runner_options(args) == {
        "host": "127.0.0.1",
        "port": 0,
        "manager_url": "http://127.0.0.1:8080",
        "advertise_url": None,
        "trusted_livekit_urls": (),
        "max_sessions": None,
        "presence": True,
    }
    assert args.log_level == "INFO"


def test_the_environment_overrides_the_code() -> None:
    args = parse(
        [], {MANAGER_URL_ENV: "http://from-env:9000"}, service_id="echo-1", manager_url="http://x"
    )
    assert args.manager_url == "http://from-env:9000"


def test_an_empty_environment_variable_counts_as_unset() -> None:
    args = parse([], {MANAGER_URL_ENV: ""}, service_id="echo-1", manager_url="http://code:1")
    assert args.manager_url == "http://code:1"


def test_flags_override_the_environment_and_the_code() -> None:
    args = parse(
        [
            "--service-id",
            "echo-2",
            "--host",
            "0.0.0.0",
            "--port",
            "9001",
            "--manager-url",
            "http://from-flag:1",
            "--advertise-url",
            "http://echo.internal:9001",
            "--trust-livekit-url",
            "ws://other-lk:7880",
            "--max-sessions",
            "8",
            "--log-level",
            "debug",
        ],
        {MANAGER_URL_ENV: "http://from-env:9000"},
        service_id="echo-1",
        port=8002,
        manager_url="http://code:1",
        trusted_livekit_urls=["ws://lk:7880"],
        max_sessions=4,
    )

    assert args.service_id == "echo-2"
    assert args.log_level == "DEBUG"
    assert runner_options(args) == {
        "host": "0.0.0.0",
        "port": 9001,
        "manager_url": "http://from-flag:1",
        "advertise_url": "http://echo.internal:9001",
        # A LiveKit to trust is added to those the code trusts.
        "trusted_livekit_urls": ("ws://lk:7880", "ws://other-lk:7880"),
        "max_sessions": 8,
        "presence": True,
    }


def test_the_service_id_is_required_when_the_code_gives_none() -> None:
    with pytest.raises(Refused, match="--service-id"):
        parse([])
    assert parse(["--service-id", "x"]).service_id == "x"


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--max-sessions", "0"], "must be 1 or more"),
        (["--max-sessions", "many"], "not an integer"),
        (["--log-level", "loud"], "one of DEBUG, INFO, WARNING, ERROR"),
        (["--port", "eighty"], "invalid int value"),
    ],
)
def test_bad_flag_values_are_refused_with_a_reason(argv: list[str], complaint: str) -> None:
    with pytest.raises(Refused, match=complaint):
        parse(argv, service_id="echo-1")


def test_the_api_key_is_never_a_flag() -> None:
    with pytest.raises(Refused):
        parse(["--api-key", "sk_x"], service_id="echo-1")


# --- MicroserviceRunner reads the environment -------------------------------------------------


@dataclass
class FakeManager:
    """Answers registrations like the manager; keeps their bodies and Authorization headers."""

    registrations: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    authorizations: list[str | None] = field(default_factory=list)

    async def register(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.authorizations.append(request.headers.get("Authorization"))
        await self.registrations.put(body)
        return web.json_response(
            {
                "success": True,
                "service_id": body["service_id"],
                "message": "registered",
                "signing_secret": SECRET,
                "livekit_url": "ws://127.0.0.1:7880",
            }
        )

    async def drain(self, request: web.Request) -> web.Response:
        return web.json_response({"service_id": request.match_info["service_id"]})


@pytest.fixture
async def manager() -> AsyncIterator[tuple[str, FakeManager]]:
    fake = FakeManager()
    app = web.Application()
    app.router.add_post("/api/v1/microservices/register", fake.register)
    app.router.add_post("/api/v1/microservices/{service_id}/drain", fake.drain)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site.port}", fake
    await runner.cleanup()


async def idle(session: JoinedSession) -> None:
    return None


async def test_a_runner_registers_where_the_environment_says_with_its_key(
    manager: tuple[str, FakeManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, fake = manager
    monkeypatch.setenv(MANAGER_URL_ENV, url)
    monkeypatch.setenv(API_KEY_ENV, "sk_service_key")

    async with MicroserviceRunner("env-svc", entrypoint=idle, max_sessions=3) as service:
        registration = fake.registrations.get_nowait()

    assert registration == {
        "service_id": "env-svc",
        "endpoint": service.endpoint,
        "metadata": {"max_sessions": 3},  # the limit the SDK keeps, told to the manager too
    }
    assert fake.authorizations == ["Bearer sk_service_key"]


async def test_a_runners_own_arguments_win_over_the_environment(
    manager: tuple[str, FakeManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, fake = manager
    monkeypatch.setenv(MANAGER_URL_ENV, f"http://127.0.0.1:{free_port()}")  # nobody there
    monkeypatch.setenv(API_KEY_ENV, "sk_from_env")

    async with MicroserviceRunner(
        "arg-svc", entrypoint=idle, manager_url=url, api_key=None, metadata={"type": "ECHO"}
    ):
        registration = fake.registrations.get_nowait()

    assert registration["metadata"] == {"type": "ECHO"}
    assert fake.authorizations == [None]


# --- run_service as a process -----------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import logging

    from session_manager.sdk import JoinedSession, run_service


    async def entrypoint(session: JoinedSession) -> None:
        logging.getLogger("echo").info("joined", extra={{"user": session.user_identity}})


    run_service(
        "echo-from-code",
        entrypoint=entrypoint,
        manager_url="http://127.0.0.1:{dead_port}",
        metadata={{"type": "ECHO", "max_sessions": 2}},
    )
    """
)


async def test_run_service_takes_flags_over_the_environment_over_the_code(
    manager: tuple[str, FakeManager], tmp_path: Path
) -> None:
    url, fake = manager
    script = tmp_path / "echo_service.py"
    script.write_text(SCRIPT.format(dead_port=free_port()))
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        MANAGER_URL_ENV: url,  # over the code's manager_url, where nobody listens
        API_KEY_ENV: "sk_echo",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--service-id",
        "echo-from-flag",
        "--port",
        "0",
        "--max-sessions",
        "5",
        "--log-level",
        "debug",
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        registration = await asyncio.wait_for(fake.registrations.get(), 30)
        async with (
            aiohttp.ClientSession() as http,
            http.get(registration["endpoint"] + "/health") as response,
        ):
            assert await response.json() == {
                "status": "healthy",
                "service_id": "echo-from-flag",
                "sessions": 0,
            }
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0, stderr.decode()
    assert registration["service_id"] == "echo-from-flag"
    assert registration["metadata"] == {"type": "ECHO", "max_sessions": 5}
    assert fake.authorizations == ["Bearer sk_echo"]
    log = stderr.decode()
    assert " DEBUG " in log  # --log-level debug took effect
    assert "microservice stopped" in log


def readme_example() -> str:
    """The README's example service (the python block that calls `run_service`)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.M | re.S)
    [example] = [block for block in blocks if "entrypoint=entrypoint" in block]
    return str(example)


async def test_the_readme_example_registers_as_documented(
    manager: tuple[str, FakeManager], tmp_path: Path
) -> None:
    url, fake = manager
    script = tmp_path / "echo.py"
    script.write_text(readme_example())
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), MANAGER_URL_ENV: url}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--port",
        "0",  # over the example's 8002, which something else may hold
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        registration = await asyncio.wait_for(fake.registrations.get(), 30)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0, stderr.decode()
    assert registration["service_id"] == "echo-1"
    assert registration["metadata"] == {"type": "ECHO", "max_sessions": 4}


async def test_run_service_refuses_an_unknown_flag_with_its_usage(tmp_path: Path) -> None:
    script = tmp_path / "echo_service.py"
    script.write_text(SCRIPT.format(dead_port=free_port()))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--no-such-flag",
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)

    assert process.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in stderr.decode()
    assert "--manager-url" in stderr.decode()  # the usage names the SDK's flags


def test_presence_is_on_unless_the_flag_or_the_environment_turns_it_off() -> None:
    assert runner_options(parse([], service_id="echo-1"))["presence"] is True
    assert runner_options(parse(["--no-presence"], service_id="echo-1"))["presence"] is False
    off = parse([], {"SESSION_MANAGER_PRESENCE": "off"}, service_id="echo-1")
    assert runner_options(off)["presence"] is False
    on = parse([], {"SESSION_MANAGER_PRESENCE": "on"}, service_id="echo-1")
    assert runner_options(on)["presence"] is True
    assert runner_options(parse([], service_id="echo-1", presence=False))["presence"] is False
