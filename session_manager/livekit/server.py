"""A livekit-server run as the manager's child process when no external LiveKit is configured.

It gets a generated config file (its own API key and a random secret, our webhook URL, loopback
binding), is polled until it answers `GET /` with OK, and is stopped with SIGTERM, then SIGKILL.
If it dies on its own it is started again from the same file (same ports and key pair: tokens
already handed out stay valid), after a backoff, until it is asked to stop.
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
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from session_manager.errors import StartupFailed
from session_manager.livekit.install import cached_binary
from session_manager.logs import TRACE
from session_manager.supervision import cancel_and_wait, watch

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Only in a clone (scripts/install-livekit.sh); an installed package finds nothing here.
BUNDLED_BINARY = PROJECT_ROOT / ".cache" / "bin" / "livekit-server"
MANAGED_API_KEY = "session-manager"
GRACEFUL_STOP = 2.0  # seconds LiveKit may drain after the first SIGTERM
FIRST_RESTART_DELAY = 0.5  # seconds before the first restart; doubled after each quick death
STABLE_AFTER = 60.0  # seconds a run must last for the backoff to start over
RELAY_FLUSH = 1.0  # seconds the output relay of an exited child may take to log its last lines


_PR_SET_PDEATHSIG = 1
# Loaded here, in the parent: the child between fork and exec must not load libraries.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """In the child before exec: have the kernel kill it when its parent dies, so a manager that
    is killed outright leaves no livekit-server holding its ports (Linux only). SIGKILL, not
    SIGTERM: with nobody left to send the second SIGTERM, LiveKit may hang in its drain."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


WORKDIR_PREFIX = "session-manager-livekit-"  # + the manager's pid + "-" + random


def remove_stale_workdirs(tmp: Path | None = None) -> list[Path]:
    """A manager killed outright cannot remove its LiveKit config file, which holds the API
    secret: remove those whose manager (the pid in the folder's name) is gone."""
    removed = []
    for folder in (tmp or Path(tempfile.gettempdir())).glob(f"{WORKDIR_PREFIX}*"):
        owner = folder.name.removeprefix(WORKDIR_PREFIX).split("-", 1)[0]
        if owner.isdigit() and Path(f"/proc/{owner}").exists():
            continue  # a live manager's (on a shared /tmp, maybe another one's)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed LiveKit config left by a killed manager", extra={"count": len(removed)})
    return removed


class LiveKitServerError(StartupFailed):
    """The managed livekit-server could not be found or started."""


def find_binary(configured: str | None) -> str:
    """The livekit-server to run: the configured one, else the first of
    1. the per-user cache of `session-manager install-livekit` (the pinned tag),
    2. a clone's .cache/bin (scripts/install-livekit.sh builds the pinned tag there),
    3. `livekit-server` on PATH (any version: a package manager's, or the container image's).
    The two pinned builds come before PATH on purpose: a machine may carry an older LiveKit on
    PATH, and the manager should run the version it was tested with whenever one is at hand.
    To run another, set livekit_server_binary."""
    if configured:
        if not os.access(configured, os.X_OK):
            raise LiveKitServerError(f"livekit-server binary {configured} is not executable")
        return configured
    cached = cached_binary()
    for candidate in (cached, BUNDLED_BINARY):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("livekit-server")
    if found:
        return found
    raise LiveKitServerError(
        f"livekit-server not found (not in {cached.parent}, nor on PATH): run "
        "`session-manager install-livekit` (needs Go), put a livekit-server on PATH, or set "
        "LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET to use an external LiveKit"
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
            # Only CreateRoom makes a room: a participant joining late (a service whose
            # connect outlived its session) must not bring a deleted room back.
            "room:",
            "  auto_create: false",
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
        # Hex: a secret that starts with "-" (as a URL-safe one may) is taken for a flag by
        # every command line it is passed on (`--livekit-api-secret -x…`).
        api_secret=api_secret or secrets.token_hex(32),
    )


class RestartBackoff:
    """How long to wait before starting the child again: `first`, doubled after each death or
    failed start up to `maximum`; a run that lasted `stable_after` seconds starts over at `first`.
    """

    def __init__(self, *, first: float, maximum: float, stable_after: float) -> None:
        self._first = min(first, maximum)
        self._maximum = maximum
        self._stable_after = stable_after
        self._next = self._first

    def after_run(self, ran_for: float) -> float:
        """The wait before the next start after a run of `ran_for` seconds (0: never came up)."""
        if ran_for >= self._stable_after:
            self._next = self._first
        delay = self._next
        self._next = min(self._next * 2, self._maximum)
        return delay


ExitListener = Callable[[int], None]


class ManagedLiveKitServer:
    """Owns one livekit-server child process, the task that relays its output to our log, and
    the keeper task that restarts it when it dies unasked. Only `aclose` stops it for good."""

    def __init__(
        self,
        config: ManagedLiveKitConfig,
        *,
        restart_max_backoff: float = 30.0,
        restart_first_backoff: float = FIRST_RESTART_DELAY,
        stable_after: float = STABLE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.restarts = 0  # times it was brought back after dying
        self._backoff = RestartBackoff(
            first=restart_first_backoff, maximum=restart_max_backoff, stable_after=stable_after
        )
        self._clock = clock
        self._process: asyncio.subprocess.Process | None = None
        self._relay: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._config_path: Path | None = None
        self._start_timeout = 0.0
        self._up_since = 0.0
        self._exit_listeners: list[ExitListener] = []

    def add_exit_listener(self, listener: ExitListener) -> None:
        """Have `listener(returncode)` called, on the event loop, each time the running child
        exits without being asked to, before it is restarted. It must not block."""
        self._exit_listeners.append(listener)

    async def start(self, *, timeout: float) -> None:
        self._start_timeout = timeout
        remove_stale_workdirs()
        self._workdir = tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
        self._config_path = Path(self._workdir.name) / "livekit.yaml"
        # Created 0600 before the secret is written into it.
        self._config_path.touch(mode=0o600)
        self._config_path.write_text(self.config.render(), encoding="utf-8")
        log.info(
            "starting managed livekit-server",
            extra={"binary": self.config.binary, "url": self.config.url},
        )
        try:
            await self._launch(timeout)
        except BaseException:
            await self.aclose()
            raise
        log.info("managed livekit-server is up", extra={"url": self.config.url, "pid": self.pid})
        self._keeper = asyncio.create_task(self._keep_running(), name="livekit-server-keeper")
        watch(self._keeper, self._keeper_died)

    async def _launch(self, timeout: float) -> None:
        """Start the child and wait until it answers. On failure the child is left in
        `_process` for the caller to stop."""
        assert self._config_path is not None
        self._process = await asyncio.create_subprocess_exec(
            self.config.binary,
            "--config",
            str(self._config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in our terminal reaches us, and we stop it in order
            preexec_fn=die_with_parent,
        )
        self._relay = asyncio.create_task(
            self._relay_output(self._process), name="livekit-server-output"
        )
        try:
            async with asyncio.timeout(timeout):
                await self._wait_until_up(self._process)
        except TimeoutError:
            raise LiveKitServerError(
                f"livekit-server did not answer on {self.config.url} within {timeout}s"
            ) from None
        self._up_since = self._clock()

    async def _wait_until_up(self, process: asyncio.subprocess.Process) -> None:
        probe = f"http://{self.config.host}:{self.config.port}/"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while True:
                if process.returncode is not None:
                    raise LiveKitServerError(
                        f"livekit-server exited with code {process.returncode} at start "
                        f"(is port {self.config.port} already in use?)"
                    )
                with suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(probe) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)

    async def _keep_running(self) -> None:
        """Wait for the child to exit; then start it again after a backoff, until one comes
        up. An exit here is always unasked: `aclose` cancels this task before it stops the
        child."""
        while True:
            process = self._process
            assert process is not None
            code = await process.wait()
            ran_for = self._clock() - self._up_since
            await self._stop_child(GRACEFUL_STOP)  # it has exited: this only ends the relay
            # A single node without Redis keeps its rooms in memory: every room is gone with it.
            log.error(
                "managed livekit-server exited unexpectedly",
                extra={"returncode": code, "ran_for": round(ran_for, 3)},
            )
            self._tell_exit(code)
            delay = self._backoff.after_run(ran_for)
            attempt = 1
            while not await self._restart(attempt, delay):
                attempt += 1
                delay = self._backoff.after_run(0.0)
            self.restarts += 1

    async def _restart(self, attempt: int, delay: float) -> bool:
        log.warning(
            "restarting managed livekit-server",
            extra={"attempt": attempt, "delay": delay, "url": self.config.url},
        )
        await asyncio.sleep(delay)
        try:
            await self._launch(self._start_timeout)
        except (LiveKitServerError, OSError) as exc:
            log.error(
                "managed livekit-server restart failed",
                extra={"attempt": attempt, "error": str(exc)},
            )
            await self._stop_child(GRACEFUL_STOP)
            return False
        log.warning(
            "managed livekit-server restarted",
            extra={"attempt": attempt, "pid": self.pid, "url": self.config.url},
        )
        return True

    def _tell_exit(self, code: int) -> None:
        for listener in list(self._exit_listeners):
            try:
                listener(code)
            except Exception:  # a listener's bug must not stop the restarts
                log.exception("livekit-server exit listener failed")

    @staticmethod
    def _keeper_died(error: BaseException | None) -> None:
        # Logged with its traceback by `watch`; what is lost is said here.
        log.error("managed livekit-server will not be restarted if it dies now")

    async def _relay_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            log.log(
                TRACE,
                "livekit-server output",
                extra={"line": raw.decode(errors="replace").rstrip()},
            )

    async def _stop_child(self, timeout: float) -> None:
        """Stop the current child if it runs, and end its output relay. References are dropped
        only once done, so a caller cancelled half-way leaves them for `aclose` to finish."""
        process = self._process
        if process is not None and process.returncode is None:
            await self._stop(process, timeout)
        self._process = None
        relay = self._relay
        if relay is not None:
            await asyncio.wait([relay], timeout=RELAY_FLUSH)  # its last lines, then EOF
            await cancel_and_wait([relay])
        self._relay = None

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

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self.running else None

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop it for good: the keeper first, so that nothing restarts what is stopped next."""
        keeper, self._keeper = self._keeper, None
        await cancel_and_wait([keeper])
        await self._stop_child(timeout)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
