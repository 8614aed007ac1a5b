"""MicroserviceRunner: serves the manager-facing HTTP API, registers, and shuts down cleanly."""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import os
import signal
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
from aiohttp import web
from livekit import rtc
from yarl import URL

from .cli import (
    DEFAULT_HOST,
    DEFAULT_MANAGER_URL,
    add_service_arguments,
    api_key_from,
    manager_url_from,
    presence_from,
    runner_options,
)
from .handler import Entrypoint, EntrypointHandler, SessionHandler
from .http_routes import MicroserviceRoutes
from .log_format import configure_logging
from .owned_tasks import cancel_and_wait
from .payloads import RegisterRequest
from .presence import PresenceClient
from .registration import (
    Credentials,
    RetryBackoff,
    drain_at_manager,
    register_until_accepted,
    rotate_at_manager,
)
from .room_sessions import RoomFactory, RoomSessions
from .verification import CallVerifier, TrustedLiveKit

logger = logging.getLogger(__name__)

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
MAX_SESSIONS_KEY = "max_sessions"  # in the registration metadata, as the manager reads it


class _FromEnvironment(enum.Enum):
    """A default read from the environment when the runner is made."""

    VALUE = "from the environment"


FROM_ENVIRONMENT: Final = _FromEnvironment.VALUE


class ServiceClosedError(RuntimeError):
    """The runner was closed before `start()` could finish."""


class MicroserviceRunner:
    """Runs one microservice: the HTTP endpoints the manager calls, and its registration.

    Use it as ``async with MicroserviceRunner(...) as runner:`` or call `start()` / `aclose()`;
    `run()` does both around a wait for SIGINT/SIGTERM.

    The service is a `handler` (a `SessionHandler`) or an `entrypoint` function (``async def
    entrypoint(session: JoinedSession)``, which is that handler's `on_join`), one of the two.

    `manager_url` defaults to `SESSION_MANAGER_URL`, else http://127.0.0.1:8080; `api_key` to
    `SESSION_MANAGER_API_KEY`. `manager_url=None` skips registration (for a manager that knows
    the service otherwise); then `signing_secret` (the `whsec_…` the manager answered when the
    service was registered) and `trusted_livekit_urls` are required.
    `max_sessions` (else the registration metadata's `max_sessions`) bounds the sessions served
    at once: a join-room for one more is answered 503, which the manager takes as a decline.
    Given here, it is also what the registration metadata says.
    `room_factory` makes an unconnected `rtc.Room`; tests inject a fake one.
    `presence` (default: on unless `SESSION_MANAGER_PRESENCE=off`) keeps one connection to the
    manager from a thread of its own once registered (`presence`): if the process dies, the
    manager knows within a second and moves its sessions; `aclose()` says goodbye after
    draining, so a shutdown moves nothing by surprise.

    Only calls the manager signed are acted on (see `verification`): the secret comes from the
    register answer (a restarted service asks the manager for a new one), or from
    `signing_secret`; `rotate_secret()` gets a new one from the manager. join-room connects only
    to the LiveKit URL the manager reported when it registered the service, or to one of
    `trusted_livekit_urls`.
    """

    def __init__(
        self,
        service_id: str,
        handler: SessionHandler | None = None,
        *,
        entrypoint: Entrypoint | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        manager_url: str | _FromEnvironment | None = FROM_ENVIRONMENT,
        metadata: Mapping[str, Any] | None = None,
        max_sessions: int | None = None,
        advertise_url: str | None = None,
        connect_timeout: float = 10.0,
        room_factory: RoomFactory | None = None,
        request_timeout: float = 5.0,
        registration_backoff: RetryBackoff | None = None,
        shutdown_timeout: float = 10.0,
        signing_secret: str | None = None,
        trusted_livekit_urls: Iterable[str] = (),
        api_key: str | _FromEnvironment | None = FROM_ENVIRONMENT,
        presence: bool | _FromEnvironment = FROM_ENVIRONMENT,
    ) -> None:
        if not service_id:
            raise ValueError("service_id must not be empty")
        if (handler is None) == (entrypoint is None):
            raise ValueError("give either a handler or an entrypoint, not both or neither")
        if handler is None:
            assert entrypoint is not None
            handler = EntrypointHandler(entrypoint)
        if manager_url is FROM_ENVIRONMENT:
            manager_url = manager_url_from(os.environ, DEFAULT_MANAGER_URL)
        if api_key is FROM_ENVIRONMENT:
            api_key = api_key_from(os.environ, None)
        if presence is FROM_ENVIRONMENT:
            presence = presence_from(os.environ)
        metadata = dict(metadata or {})
        max_sessions = _capacity(max_sessions, metadata)
        self._verifier = CallVerifier(signing_secret)
        self._trusted_livekit = TrustedLiveKit(trusted_livekit_urls)
        if manager_url is None and not self._verifier.has_secret:
            raise ValueError("without manager_url, give signing_secret: unsigned calls are refused")
        if manager_url is None and self._trusted_livekit.empty:
            raise ValueError("without manager_url, give trusted_livekit_urls to join rooms")
        if connect_timeout <= 0 or request_timeout <= 0 or shutdown_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self._service_id = service_id
        # Sent as `Authorization: Bearer` on every call to the manager (register, drain,
        # rotate-secret) when the manager has `api_keys`: a key with the `service` scope.
        self._api_key = api_key
        # Once registered, a connection held from a thread of its own (`presence`): its loss
        # without a goodbye tells the manager at once that this process is dead.
        self._presence_wanted = presence
        self._presence: PresenceClient | None = None
        self._host = host
        self._requested_port = port
        self._manager_url = manager_url
        self._metadata = metadata
        self._max_sessions = max_sessions
        self._advertise_url = advertise_url.rstrip("/") if advertise_url else None
        self._request_timeout = request_timeout
        self._backoff = registration_backoff or RetryBackoff()
        self._shutdown_timeout = shutdown_timeout
        self._sessions = RoomSessions(
            service_id=service_id,
            handler=handler,
            room_factory=room_factory or rtc.Room,
            connect_timeout=connect_timeout,
            teardown_grace=shutdown_timeout,
            max_sessions=max_sessions,
        )
        self._app_runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._http: aiohttp.ClientSession | None = None
        self._registration: asyncio.Task[Credentials] | None = None
        self._started = False
        self._registered = False
        self._closed = False
        # Serialises start-up of the server with shutdown, and makes aclose() run once.
        self._lifecycle_lock = asyncio.Lock()

    @property
    def service_id(self) -> str:
        return self._service_id

    @property
    def port(self) -> int:
        """The port actually bound (useful with port=0)."""
        if self._site is None:
            raise RuntimeError("the runner is not serving; call start() first")
        return self._site.port

    @property
    def endpoint(self) -> str:
        """The URL the manager is given to reach this service."""
        if self._advertise_url is not None:
            return self._advertise_url
        return str(URL.build(scheme="http", host=self._host, port=self.port))

    @property
    def sessions(self) -> frozenset[str]:
        """Ids of the sessions whose rooms are currently joined."""
        return self._sessions.joined_ids()

    @property
    def registered(self) -> bool:
        return self._registered

    @property
    def max_sessions(self) -> int | None:
        """The sessions served at once at most; None: no limit."""
        return self._max_sessions

    async def start(self) -> None:
        """Serve HTTP, then register with the manager, retrying until it accepts.

        Raises RegistrationError if the manager refuses, ServiceClosedError if `aclose()` ran
        first. On any failure the runner is closed again before the exception propagates.
        """
        if self._started:
            raise RuntimeError("MicroserviceRunner.start() may be called only once")
        self._started = True
        try:
            async with self._lifecycle_lock:
                if self._closed:
                    raise ServiceClosedError("the runner was closed before it started")
                await self._serve_http()
            if self._manager_url is not None:
                await self._register(self._manager_url)
        except BaseException:
            await self.aclose()
            raise

    async def _serve_http(self) -> None:
        app = MicroserviceRoutes(
            self._service_id, self._sessions, self._verifier, self._trusted_livekit
        ).build_app()
        # The sessions are wound down before the server stops, so this only bounds requests
        # still in flight at the very end.
        self._app_runner = web.AppRunner(app, shutdown_timeout=self._shutdown_timeout)
        await self._app_runner.setup()
        site = web.TCPSite(self._app_runner, self._host, self._requested_port)
        await site.start()
        self._site = site
        if self._advertise_url is None and self._host in _WILDCARD_HOSTS:
            logger.warning(
                "listening on all interfaces without advertise_url; the manager may not reach "
                "the advertised endpoint",
                extra={"endpoint": self.endpoint},
            )
        logger.info(
            "microservice listening",
            extra={"service_id": self._service_id, "endpoint": self.endpoint},
        )

    async def _register(self, manager_url: str) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else None
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._request_timeout), headers=headers
        )
        payload = RegisterRequest(
            service_id=self._service_id, endpoint=self.endpoint, metadata=self._metadata
        )
        # A task of its own so that aclose() from elsewhere can stop the retry loop at once.
        task = asyncio.create_task(
            register_until_accepted(
                self._http, manager_url, payload, self._backoff, on_credentials=self._learn
            ),
            name=f"register {self._service_id}",
        )
        self._registration = task
        try:
            with self._verifier.expecting_secret():
                await asyncio.wait({task})
        except asyncio.CancelledError:
            await cancel_and_wait(task)  # start() was cancelled: nobody is left to register for
            raise
        if task.cancelled():
            raise ServiceClosedError("the runner was closed before registration completed")
        task.result()
        self._registered = True
        if self._presence_wanted:
            self._presence = PresenceClient(manager_url, self._service_id, api_key=self._api_key)
            self._presence.start()

    def _learn(self, credentials: Credentials) -> None:
        """The manager's answer: calls are verified with this secret from now on."""
        self._verifier.set_secret(credentials.signing_secret)
        self._trusted_livekit.report(credentials.livekit_url)

    async def rotate_secret(self) -> None:
        """Have the manager make a new signing secret for this service and use it at once
        (the old one stops working at both ends). Raises RegistrationError if the manager
        refuses; RuntimeError before registration."""
        if not self._registered or self._http is None or self._manager_url is None:
            raise RuntimeError("rotate_secret() needs a service registered with a manager")
        with self._verifier.expecting_secret():
            credentials = await rotate_at_manager(self._http, self._manager_url, self._service_id)
            self._learn(credentials)
        logger.info("signing secret rotated", extra={"service_id": self._service_id})

    async def aclose(self) -> None:
        """Stop accepting work, leave every room (on_leave reason "shutdown"), stop serving.

        Safe to call more than once and from several tasks; later calls return at once.
        """
        async with self._lifecycle_lock:
            if self._closed:
                return
            self._closed = True
            logger.info("microservice shutting down", extra={"service_id": self._service_id})
            # From here join-room answers 503 and health reports shutting_down.
            # A registration still out (a SIGTERM before its answer came) may have reached the
            # manager: drain it too. One the manager refused is not ours to drain.
            unanswered = self._registration is not None and not self._registration.done()
            await cancel_and_wait(self._registration)
            await self._drain_at_manager(unanswered)
            await self._sessions.close()
            # Drained and out of every room: the goodbye says this is no death.
            if self._presence is not None:
                await self._presence.aclose()
            if self._app_runner is not None:
                await self._app_runner.cleanup()
            if self._http is not None:
                await self._http.close()
            logger.info("microservice stopped", extra={"service_id": self._service_id})

    async def _drain_at_manager(self, unanswered: bool) -> None:
        """Tell the manager to send no new sessions here; our sessions end as we leave them."""
        if not (self._registered or unanswered) or self._http is None:
            return
        if self._manager_url is None:
            return
        error = await drain_at_manager(self._http, self._manager_url, self._service_id)
        if error is not None:
            logger.info(
                "could not mark the service draining at the manager",
                extra={"service_id": self._service_id, "error": error},
            )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def run_until_signal(
        self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
    ) -> None:
        """Start, serve until one of `signals` arrives, then shut down."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        installed: list[signal.Signals] = []
        for sig in signals:
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not on this platform / thread
                continue
            installed.append(sig)
        starting = asyncio.create_task(self.start(), name=f"start {self._service_id}")
        stopping = asyncio.create_task(stop.wait(), name=f"await stop {self._service_id}")
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a refused registration ends the service here
                await stopping
            logger.info("stop signal received", extra={"service_id": self._service_id})
        finally:
            # Restored before the shutdown so that a second Ctrl-C can still force the exit.
            for sig in installed:
                loop.remove_signal_handler(sig)
            await cancel_and_wait(starting)
            await cancel_and_wait(stopping)
            await self.aclose()

    def run(self) -> None:
        """Blocking: run the service in a new event loop until SIGINT or SIGTERM."""
        asyncio.run(self.run_until_signal())


def _capacity(max_sessions: int | None, metadata: dict[str, Any]) -> int | None:
    """The limit: `max_sessions` when given (written into `metadata`), else the metadata's."""
    if max_sessions is not None:
        metadata[MAX_SESSIONS_KEY] = max_sessions
    limit = metadata.get(MAX_SESSIONS_KEY)
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_sessions must be an integer of 1 or more, not {limit!r}")
    return limit


def run_service(
    service_id: str | None = None,
    handler: SessionHandler | None = None,
    *,
    entrypoint: Entrypoint | None = None,
    argv: Sequence[str] | None = None,
    log_level: str = "INFO",
    **options: Any,
) -> None:
    """Run a service until SIGINT or SIGTERM, configured by its command line: blocking.

    The service is a `handler` or an `entrypoint` function (see `MicroserviceRunner`, which
    takes `options`). `service_id`, `host`, `port`, `manager_url`, `advertise_url`,
    `trusted_livekit_urls`, `max_sessions` and `log_level` given here are the defaults of the
    flags `--service-id`, `--host`, … (`session_manager.sdk.cli`); `SESSION_MANAGER_URL` and
    `SESSION_MANAGER_API_KEY` override them, and flags override both. `argv` defaults to
    `sys.argv[1:]`. Logs go to stderr (`configure_logging`) at `--log-level`. Raises
    RegistrationError when the manager refuses the registration.
    """
    parser = argparse.ArgumentParser(description=f"Session Manager service {service_id or ''}")
    add_service_arguments(
        parser,
        service_id=service_id,
        host=options.pop("host", DEFAULT_HOST),
        port=options.pop("port", 0),
        manager_url=options.pop("manager_url", DEFAULT_MANAGER_URL),
        advertise_url=options.pop("advertise_url", None),
        trusted_livekit_urls=options.pop("trusted_livekit_urls", ()),
        max_sessions=options.pop("max_sessions", None),
        log_level=log_level,
        presence=options.pop("presence", True),
    )
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    api_key = api_key_from(os.environ, options.pop("api_key", None))
    runner = MicroserviceRunner(
        args.service_id,
        handler,
        entrypoint=entrypoint,
        api_key=api_key,
        **runner_options(args),
        **options,
    )
    runner.run()
