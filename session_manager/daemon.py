"""Builds the manager's long-lived parts in order and tears them down in reverse.

store -> registry -> LiveKit (managed child or external) -> gateway -> microservice client ->
supervisor. Each teardown stage has its own timeout and its own error handling, so one stuck
stage is logged and the next one still runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import aiohttp

from session_manager.config import Settings
from session_manager.dispatch import DispatchPolicy, MicroserviceClient
from session_manager.events import EventLog, OutboundWebhooks, WebhookPolicy, WebhookTarget
from session_manager.livekit.gateway import LiveKitEndpoint, LiveKitGateway, make_endpoint
from session_manager.livekit.server import ManagedLiveKitServer, find_binary, new_config
from session_manager.livekit.webhooks import WebhookVerifier
from session_manager.registry import Registry
from session_manager.registry.health import HealthMonitor
from session_manager.session.actor import SessionDeps
from session_manager.store import MemoryStore, SqliteStore, Store
from session_manager.store.retention import RetentionSweeper
from session_manager.supervisor import Supervisor

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/livekit/webhook"


def webhook_url_for(settings: Settings, api_port: int) -> str:
    if settings.livekit_webhook_url:
        return settings.livekit_webhook_url
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{api_port}{WEBHOOK_PATH}"


class Daemon:
    """Owns every long-lived resource of one manager process."""

    def __init__(self, settings: Settings, *, api_port: int) -> None:
        self.settings = settings
        self.api_port = api_port
        self._stack = AsyncExitStack()
        self.store: Store
        self.events: EventLog
        self.outbound_webhooks: OutboundWebhooks
        self.registry: Registry
        self.gateway: LiveKitGateway
        self.livekit_webhooks: WebhookVerifier
        self.supervisor: Supervisor
        self.health: HealthMonitor
        self.livekit_server: ManagedLiveKitServer | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise

    async def _start(self) -> None:
        settings = self.settings
        stage = self._stage

        self.store = (
            SqliteStore(settings.data_dir / "session-manager.sqlite3")
            if settings.store == "sqlite"
            else MemoryStore()
        )
        await self.store.open()
        stage("store", self.store.aclose)

        self.events = EventLog(settings.event_history)
        self.outbound_webhooks = OutboundWebhooks(
            [WebhookTarget.parse(spec) for spec in settings.webhooks],
            settings.webhook_secret.get_secret_value() if settings.webhook_secret else "",
            WebhookPolicy(
                timeout=settings.webhook_timeout,
                max_attempts=settings.webhook_max_attempts,
                base_backoff=settings.webhook_backoff,
                max_backoff=max(settings.webhook_max_backoff, settings.webhook_backoff),
                max_queue=settings.webhook_queue,
                concurrency=settings.webhook_concurrency,
            ),
        )
        await self.outbound_webhooks.start()
        # Registered before the sessions stage, so it closes after it: the events of sessions
        # ended at shutdown are still delivered.
        stage("outbound webhooks", lambda: self.outbound_webhooks.aclose(settings.shutdown_timeout))
        self.events.add_listener(self.outbound_webhooks.offer)

        sweeper = RetentionSweeper(
            self.store,
            session_retention=settings.session_retention,
            idempotency_ttl=settings.idempotency_ttl,
        )
        await sweeper.start()
        stage("retention sweeper", sweeper.aclose)

        self.registry = Registry(
            self.store,
            unhealthy_after=settings.unhealthy_after,
            healthy_after=settings.healthy_after,
        )
        await self.registry.load()

        endpoint = await self._livekit_endpoint()
        self.gateway = LiveKitGateway(endpoint, timeout=settings.livekit_timeout)
        await self.gateway.start()
        stage("livekit gateway", self.gateway.aclose)
        self.livekit_webhooks = WebhookVerifier(endpoint.api_key, endpoint.api_secret)

        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        stage("microservice client", http.close)
        microservices = MicroserviceClient(
            http,
            DispatchPolicy(
                timeout=settings.dispatch_timeout,
                attempts=settings.dispatch_attempts,
                backoff=settings.dispatch_backoff,
            ),
        )
        deps = SessionDeps(
            events=self.events,
            gateway=self.gateway,
            microservices=microservices,
            registry=self.registry,
            join_timeout=settings.join_timeout,
            room_empty_timeout=settings.room_empty_timeout,
            client_token_ttl=settings.client_token_ttl,
            teardown_timeout=settings.livekit_timeout,
            max_redispatch=settings.max_redispatch,
            client_join_timeout=settings.client_join_timeout,
            client_reconnect_grace=settings.client_reconnect_grace,
        )
        self.supervisor = Supervisor(
            self.registry,
            self.store,
            deps,
            events=self.events,
            idempotency_ttl=settings.idempotency_ttl,
        )
        await self.supervisor.start()
        stage("sessions", lambda: self.supervisor.aclose(settings.shutdown_timeout))

        self.health = HealthMonitor(
            self.registry,
            microservices,
            interval=settings.health_interval,
            timeout=settings.health_timeout,
            on_change=self.supervisor.health_changed,
        )
        await self.health.start()
        stage("health monitor", self.health.aclose)
        log.info(
            "session manager ready",
            extra={
                "livekit_url": endpoint.public_url,
                "managed_livekit": self.livekit_server is not None,
                "services": len(self.registry.all()),
            },
        )

    async def _livekit_endpoint(self) -> LiveKitEndpoint:
        settings = self.settings
        if settings.livekit_url is not None:
            secret = settings.livekit_api_secret
            assert settings.livekit_api_key and secret is not None  # checked by load_settings
            return make_endpoint(
                settings.livekit_url,
                settings.livekit_api_key,
                secret.get_secret_value(),
                settings.livekit_public_url,
            )
        config = new_config(
            find_binary(settings.livekit_server_binary),
            port=settings.livekit_port,
            rtc_tcp_port=settings.livekit_rtc_tcp_port,
            rtc_udp_port=settings.livekit_rtc_udp_port,
            webhook_urls=(webhook_url_for(settings, self.api_port),),
            # LIVEKIT_API_KEY/SECRET without LIVEKIT_URL: the managed server takes that pair
            # (e.g. LiveKit's dev pair devkey/secret, for tools that assume it).
            api_key=settings.livekit_api_key,
            api_secret=(
                settings.livekit_api_secret.get_secret_value()
                if settings.livekit_api_secret
                else None
            ),
        )
        server = ManagedLiveKitServer(config)
        await server.start(timeout=settings.livekit_start_timeout)
        self.livekit_server = server
        self._stage("managed livekit-server", server.aclose)
        return make_endpoint(
            config.url, config.api_key, config.api_secret, settings.livekit_public_url
        )

    def _stage(self, name: str, close: Callable[[], Awaitable[object]]) -> None:
        timeout = self.settings.shutdown_timeout

        async def run_stage() -> None:
            try:
                await asyncio.wait_for(close(), timeout + 1)
            except TimeoutError:
                log.error("shutdown stage timed out", extra={"stage": name, "timeout": timeout})
            except Exception:
                log.exception("shutdown stage failed", extra={"stage": name})

        self._stack.push_async_callback(run_stage)

    def drain(self) -> None:
        """Stop taking sessions and end the event streams, so in-flight HTTP can finish."""
        if hasattr(self, "supervisor"):
            self.supervisor.drain()
        if hasattr(self, "events"):
            self.events.close()

    async def aclose(self) -> None:
        """Tear down in reverse order of start; safe to call twice."""
        stack, self._stack = self._stack, AsyncExitStack()
        await stack.aclose()
