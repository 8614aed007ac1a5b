"""A livekit-server run as the manager's child process when no external LiveKit is configured.

It gets a generated config file (its own API key and a random secret, our webhook URL, loopback
binding), is polled until it answers `GET /` with OK, and is stopped with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from session_manager.logs import TRACE

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_BINARY = PROJECT_ROOT / ".cache" / "bin" / "livekit-server"
MANAGED_API_KEY = "session-manager"
GRACEFUL_STOP = 2.0  # seconds LiveKit may drain after the first SIGTERM


_PR_SET_PDEATHSIG = 1
# Loaded here, in the parent: the child between fork and exec must not load libraries.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """In the child before exec: have the kernel kill it when its parent dies, so a manager that
    is killed outright leaves no livekit-server holding its ports (Linux only). SIGKILL, not
    SIGTERM: with nobody left to send the second SIGTERM, LiveKit may hang in its drain."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class LiveKitServerError(Exception):
    """The managed livekit-server could not be found or started."""


def find_binary(configured: str | None) -> str:
    if configured:
        if not os.access(configured, os.X_OK):
            raise LiveKitServerError(f"livekit-server binary {configured} is not executable")
        return configured
    if os.access(BUNDLED_BINARY, os.X_OK):
        return str(BUNDLED_BINARY)
    found = shutil.which("livekit-server")
    if found:
        return found
    raise LiveKitServerError(
        "livekit-server not found: run scripts/install-livekit.sh, or set LIVEKIT_URL, "
        "LIVEKIT_API_KEY and LIVEKIT_API_SECRET to use an external LiveKit"
    )


@dataclass(frozen=True)
class ManagedLiveKitConfig:
    binary: str
    host: str = "127.0.0.1"
    port: int = 7880
    rtc_tcp_port: int = 7881
    rtc_udp_port: int = 7882
    webhook_urls: tuple[str, ...] = ()
    api_key: str = MANAGED_API_KEY
    api_secret: str = ""

    def render(self) -> str:
        """The YAML config file. Written by hand: a handful of scalar fields needs no YAML lib."""
        lines = [
            f"port: {self.port}",
            f'bind_addresses: ["{self.host}"]',
            "rtc:",
            f"  tcp_port: {self.rtc_tcp_port}",
            f"  udp_port: {self.rtc_udp_port}",
            "  use_external_ip: false",
            "keys:",
            f"  {self.api_key}: {self.api_secret}",
            "logging:",
            "  level: info",
        ]
        if self.webhook_urls:
            lines += ["webhook:", f"  api_key: {self.api_key}", "  urls:"]
            lines += [f'    - "{url}"' for url in self.webhook_urls]
        return "\n".join(lines) + "\n"

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"


def new_config(
    binary: str,
    *,
    host: str = "127.0.0.1",
    port: int = 7880,
    rtc_tcp_port: int = 7881,
    rtc_udp_port: int = 7882,
    webhook_urls: tuple[str, ...] = (),
    api_key: str | None = None,
    api_secret: str | None = None,
) -> ManagedLiveKitConfig:
    """Without a key pair of the caller's, a fresh random secret: nothing outside this process
    needs it, so nothing can leak it."""
    return ManagedLiveKitConfig(
        binary=binary,
        host=host,
        port=port,
        rtc_tcp_port=rtc_tcp_port,
        rtc_udp_port=rtc_udp_port,
        webhook_urls=webhook_urls,
        api_key=api_key or MANAGED_API_KEY,
        api_secret=api_secret or secrets.token_urlsafe(32),
    )


class ManagedLiveKitServer:
    """Owns one livekit-server child process and the task that relays its output to our log."""

    def __init__(self, config: ManagedLiveKitConfig) -> None:
        self.config = config
        self._process: asyncio.subprocess.Process | None = None
        self._relay: asyncio.Task[None] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    async def start(self, *, timeout: float) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="session-manager-livekit-")
        config_path = Path(self._workdir.name) / "livekit.yaml"
        config_path.write_text(self.config.render(), encoding="utf-8")
        config_path.chmod(0o600)
        log.info(
            "starting managed livekit-server",
            extra={"binary": self.config.binary, "url": self.config.url},
        )
        self._process = await asyncio.create_subprocess_exec(
            self.config.binary,
            "--config",
            str(config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in our terminal reaches us, and we stop it in order
            preexec_fn=die_with_parent,
        )
        self._relay = asyncio.create_task(self._relay_output(), name="livekit-server-output")
        try:
            await asyncio.wait_for(self._wait_until_up(), timeout)
        except (TimeoutError, LiveKitServerError) as exc:
            await self.aclose()
            if isinstance(exc, LiveKitServerError):
                raise
            raise LiveKitServerError(
                f"livekit-server did not answer on {self.config.url} within {timeout}s"
            ) from None
        log.info("managed livekit-server is up", extra={"url": self.config.url})

    async def _wait_until_up(self) -> None:
        probe = f"http://{self.config.host}:{self.config.port}/"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while True:
                if self._process is not None and self._process.returncode is not None:
                    raise LiveKitServerError(
                        f"livekit-server exited with code {self._process.returncode} at start "
                        f"(is port {self.config.port} already in use?)"
                    )
                with suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(probe) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)

    async def _relay_output(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        async for raw in process.stdout:
            log.log(
                TRACE,
                "livekit-server output",
                extra={"line": raw.decode(errors="replace").rstrip()},
            )
        # Its output ends when it exits; if we did not stop it, every room is gone with it.
        code = await process.wait()
        if self._process is process:
            log.error("managed livekit-server exited unexpectedly", extra={"returncode": code})

    @staticmethod
    async def _stop(process: asyncio.subprocess.Process, timeout: float) -> None:
        """SIGTERM asks LiveKit to drain; a second SIGTERM makes it exit at once (it can hang
        draining when stopped just after start). Our rooms are gone by now, so drain briefly."""
        for signum, wait in ((signal.SIGTERM, GRACEFUL_STOP), (signal.SIGTERM, timeout)):
            with suppress(ProcessLookupError):
                process.send_signal(signum)
            try:
                await asyncio.wait_for(asyncio.shield(process.wait()), wait)
                return
            except TimeoutError:
                continue
        log.warning("livekit-server did not stop; killing it")
        with suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def aclose(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            await self._stop(process, timeout)
        if self._relay is not None:
            self._relay.cancel()
            with suppress(asyncio.CancelledError):
                await self._relay
            self._relay = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
