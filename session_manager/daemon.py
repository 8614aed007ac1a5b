"""Builds the manager's long-lived parts in named stages and tears them down in reverse.

store -> events -> retention -> registry -> LiveKit (managed child or external) and gateway ->
microservice client -> sessions (the supervisor) -> presence -> LiveKit watch -> health monitor.
Each teardown stage has its own timeout and its own error handling, so one stuck stage is logged
and the next one still runs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from session_manager.clock import now_rfc3339
from session_manager.cluster.node import ClusterNode
from session_manager.config import Settings
from session_manager.dispatch import DispatchPolicy, MicroserviceClient
from session_manager.egress import EndpointAllow, EndpointGuard
from session_manager.errors import ManagerError, StartupFailed
from session_manager.events import EventLog, OutboundWebhooks, WebhookPolicy, WebhookTarget
from session_manager.gc_pauses import GcPauseRecorder
from session_manager.health_board import CLUSTER, STORE, SUPERVISOR, HealthBoard, Problem
from session_manager.livekit.gateway import LiveKitEndpoint, LiveKitGateway, make_endpoint
from session_manager.livekit.server import ManagedLiveKitServer, find_binary, new_config
from session_manager.livekit.watch import LiveKitWatch
from session_manager.livekit.webhooks import WebhookVerifier
from session_manager.loop_lag import LoopLagProbe
from session_manager.metrics import Metrics
from session_manager.redis_connection import RedisUrl
from session_manager.registry import Registry
from session_manager.registry.health import HealthMonitor, HealthResults, health_session
from session_manager.registry.presence import PresenceBoard, PresencePolicy
from session_manager.session.deps import SessionDeps
from session_manager.session.record import SessionRecord
from session_manager.store import MemoryStore, SqliteStore, Store
from session_manager.store.retention import RetentionSweeper
from session_manager.supervisor import Supervisor
from session_manager.takeover import Adoption, SessionTakeOver

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
    """Owns every long-lived resource of one manager process, and says when it cannot serve.

    Start-up runs named stages in order; each registers its teardown, and teardown runs them in
    reverse. A core loop that dies and cannot be rebuilt in place calls `fail`: the process then
    exits non-zero (crash-only), and /health turns 503 at once.
    """

    def __init__(
        self, settings: Settings, *, api_port: int, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.api_port = api_port
        self.metrics = metrics or Metrics()
        self._stack = AsyncExitStack()
        self.board = HealthBoard()
        self.failed = asyncio.Event()
        self.failure: str | None = None
        self.draining = ""  # since when (RFC 3339) this process has been shutting down
        self.store: Store
        self.events: EventLog
        self.outbound_webhooks: OutboundWebhooks
        self.registry: Registry
        self.gateway: LiveKitGateway
        self.livekit_webhooks: WebhookVerifier
        self.microservices: MicroserviceClient
        self.egress: EndpointGuard
        self.supervisor: Supervisor
        self.health: HealthMonitor
        self.presence: PresenceBoard
        self.livekit_server: ManagedLiveKitServer | None = None
        self.node_id = uuid.uuid4().hex[:16]  # this process among the managers on one Redis
        self.cluster: ClusterNode | None = None
        self._cluster_adopted: list[Adoption] = []

    def fail(self, component: str, reason: str) -> None:
        """A core part is gone for good: report it and have the process exit non-zero."""
        self.board.down(component, reason)
        if self.failure is None:
            self.failure = f"{component}: {reason}"
            self.failed.set()

    async def start(self) -> None:
        gc_pauses = GcPauseRecorder(self.metrics.observe_gc_pause)
        gc_pauses.open()
        self._stack.callback(gc_pauses.close)
        loop_lag = LoopLagProbe(self.metrics.observe_loop_lag)
        loop_lag.open()
        self._stack.callback(loop_lag.close)
        try:
            for name, stage in (
                ("store", self._open_store),
                ("events", self._start_events),
                ("retention", self._start_retention),
                ("registry", self._load_registry),
                ("livekit", self._connect_livekit),
                ("microservice client", self._start_microservice_client),
                ("cluster", self._join_cluster),
                ("sessions", self._start_sessions),
                ("presence", self._start_presence),
                ("livekit watch", self._watch_livekit),
                ("health monitor", self._start_health_monitor),
            ):
                log.debug("starting stage", extra={"stage": name})
                await stage()
        except BaseException:
            await self.aclose()
            raise
        log.info(
            "session manager ready",
            extra={
                "livekit_url": self.gateway.endpoint.public_url,
                "managed_livekit": self.livekit_server is not None,
                "services": len(self.registry.all()),
            },
        )

    async def _open_store(self) -> None:
        settings = self.settings
        board, fail = self.board, self.fail
        options: dict[str, Any] = {
            "board": board,
            "on_fatal": lambda reason: fail(STORE, reason),
            "max_pending": settings.store_max_pending,
            "flush_timeout": settings.store_flush_timeout,
            "on_write": self.metrics.observe_store_write,
        }
        if settings.store == "redis":
            # Not exported by session_manager.store, whose other users need no Redis client.
            from session_manager.store.redis_store import RedisStore

            self.store = RedisStore(
                settings.redis_url,
                prefix=settings.redis_prefix,
                timeout=settings.redis_timeout,
                **options,
            )
        elif settings.store == "sqlite":
            self.store = SqliteStore(settings.data_dir / "session-manager.sqlite3", **options)
        else:
            self.store = MemoryStore(**options)
        await self.store.open()
        self._stage("store", self.store.aclose)

    async def _start_events(self) -> None:
        settings = self.settings
        feed = None
        if settings.store == "redis":
            # Every manager on that Redis shares one stream of events (ids, SSE resumes, and
            # each outbound webhook sent by one of them): see events.redis_feed.
            from session_manager.events.redis_feed import RedisEventFeed

            feed = RedisEventFeed(
                settings.redis_url,
                node_id=self.node_id,
                prefix=settings.redis_prefix,
                history=settings.event_history,
                timeout=settings.redis_timeout,
                board=self.board,
                on_fatal=lambda reason: self.fail(STORE, reason),
                start_timeout=settings.store_flush_timeout,
            )
        self.events = EventLog(settings.event_history, sink=feed)
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
            on_attempt=self.metrics.observe_webhook,
        )
        await self.outbound_webhooks.start()
        # Registered before the sessions stage, so it closes after it: the events of sessions
        # ended at shutdown are still delivered.
        self._stage(
            "outbound webhooks", lambda: self.outbound_webhooks.aclose(settings.shutdown_timeout)
        )
        if feed is None:
            self.events.add_listener(self.outbound_webhooks.offer)
            return
        if self.outbound_webhooks.targets:
            feed.outbound(self.outbound_webhooks.offer)
        await feed.start(self.events)
        # Registered after the webhooks, so it closes before them (what it still takes from
        # Redis at close is delivered) and after the sessions (their last events are written).
        self._stage("event feed", lambda: feed.aclose(settings.shutdown_timeout))

    async def _start_retention(self) -> None:
        sweeper = RetentionSweeper(
            self.store,
            session_retention=self.settings.session_retention,
            idempotency_ttl=self.settings.idempotency_ttl,
        )
        await sweeper.start()
        self._stage("retention sweeper", sweeper.aclose)

    async def _load_registry(self) -> None:
        self.registry = Registry(
            self.store,
            unhealthy_after=self.settings.unhealthy_after,
            healthy_after=self.settings.healthy_after,
        )
        await self.registry.load()
        registry = self.registry
        self.metrics.is_registered = lambda service_id: registry.find(service_id) is not None

    async def _connect_livekit(self) -> None:
        endpoint = await self._livekit_endpoint()
        self.gateway = LiveKitGateway(
            endpoint,
            timeout=self.settings.livekit_timeout,
            on_call=self.metrics.observe_livekit_call,
        )
        await self.gateway.start()
        self._stage("livekit gateway", self.gateway.aclose)
        self.livekit_webhooks = WebhookVerifier(endpoint.api_key, endpoint.api_secret)

    async def _start_microservice_client(self) -> None:
        settings = self.settings
        # endpoint_allow: checked at registration, and by the resolver of every service call.
        self.egress = EndpointGuard(EndpointAllow.parse(settings.endpoint_allow))
        self._stage("endpoint guard", self.egress.aclose)
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, resolver=self.egress.resolver)
        )
        self._stage("microservice client", http.close)
        self.microservices = MicroserviceClient(
            http,
            DispatchPolicy(
                timeout=settings.dispatch_timeout,
                attempts=settings.dispatch_attempts,
                backoff=settings.dispatch_backoff,
            ),
            guard=self.egress,
            secrets=self.registry.signing_secrets,
            on_join_room=self.metrics.observe_join_room,
        )

    async def _start_sessions(self) -> None:
        settings = self.settings
        deps = SessionDeps(
            events=self.events,
            gateway=self.gateway,
            microservices=self.microservices,
            registry=self.registry,
            join_timeout=settings.join_timeout,
            room_empty_timeout=settings.room_empty_timeout,
            client_token_ttl=settings.client_token_ttl,
            teardown_timeout=settings.livekit_timeout,
            max_redispatch=settings.max_redispatch,
            client_join_timeout=settings.client_join_timeout,
            client_reconnect_grace=settings.client_reconnect_grace,
            deployment=settings.deployment,
            max_session_duration=settings.max_session_duration,
            persist=self._persist_session,
            on_ready=self.metrics.observe_ready,
            on_failover=self.metrics.observe_failover,
        )
        # Sessions are kept at shutdown only where the next process can adopt them: a stored
        # session (not the memory store) in a room that outlives this process (not the managed
        # LiveKit, which stops with it).
        rooms_survive = self.livekit_server is None
        keep = settings.shutdown_mode == "keep" and settings.store != "memory" and rooms_survive
        if self.cluster is not None:
            adopted = self._cluster_adopted  # claimed when joining the cluster
        else:
            try:
                adopted = (await self._takeover(rooms_survive).run()).adopted
            except ManagerError as exc:
                raise StartupFailed(
                    f"sessions left by the previous process could not be read: {exc.message}"
                ) from None
        self.supervisor = Supervisor(
            self.registry,
            self.store,
            deps,
            events=self.events,
            board=self.board,
            on_fatal=lambda reason: self.fail(SUPERVISOR, reason),
            idempotency_ttl=settings.idempotency_ttl,
            startup_timeout=settings.store_flush_timeout,
            room_sweep_interval=settings.room_sweep_interval,
            max_live_sessions=settings.max_live_sessions,
            max_sessions_per_user=settings.max_sessions_per_user,
            max_services=settings.max_services,
            keep_sessions_at_shutdown=keep,
            cluster=self.cluster,
            warm_pools=settings.warm_pools,
        )
        await self.supervisor.start(adopted)
        self._stage("sessions", lambda: self.supervisor.aclose(settings.shutdown_timeout))

    async def _start_presence(self) -> None:
        """SDK instances' presence connections (`registry.presence`): a loss without a goodbye
        is a dead process. Closed (judging nothing) before the sessions stop."""
        settings, registry = self.settings, self.registry
        cluster = self.cluster

        def draining(service_id: str) -> bool:
            record = registry.find(service_id)
            return record is not None and record.draining

        self.presence = PresenceBoard(
            PresencePolicy(
                interval=settings.presence_interval,
                timeout=settings.presence_timeout,
                grace=settings.presence_grace,
            ),
            on_lost=self.supervisor.process_lost,
            is_draining=draining,
            share=cluster.bus.share_presence if cluster is not None else None,
        )
        if cluster is not None:
            cluster.bus.presence_seen = self.presence.remote_seen
            cluster.bus.presence_lost = self.presence.remote_lost
        self._stage("presence", self.presence.aclose)

    def _takeover(self, rooms_survive: bool) -> SessionTakeOver:
        settings = self.settings
        return SessionTakeOver(
            self.store,
            self.gateway,
            self.events,
            rooms_survive=rooms_survive,
            deployment=settings.deployment,
            livekit_timeout=settings.livekit_timeout,
            flush_timeout=settings.store_flush_timeout,
        )

    async def _persist_session(self, record: SessionRecord) -> None:
        """A new session is owned (in a cluster, with its places on the instances it uses) and
        stored before its room is created."""
        if self.cluster is not None:
            places = {}
            for slot in record.services.values():
                service = self.registry.find(slot.service_id)
                places[slot.service_id] = service.max_sessions if service else None
            # max_live_sessions holds across the cluster too (each process also keeps it alone).
            max_live = self.settings.max_live_sessions
            await self.cluster.claim_new(record.session_id, places, max_live)
        await self.store.flush()

    async def _join_cluster(self) -> None:
        """With store = "redis", this process is one of the managers sharing that Redis: it
        claims the sessions no process owns (adopted in the sessions stage)."""
        settings = self.settings
        if settings.store != "redis":
            return
        redis = RedisUrl(settings.redis_url).connect(timeout=settings.redis_timeout)
        self._stage("cluster redis client", redis.aclose)
        cluster = ClusterNode(
            redis,
            self.store,
            self._takeover(rooms_survive=True),
            prefix=settings.redis_prefix,
            node_id=self.node_id,
            lease_ttl=settings.lease_ttl,
            timeout=settings.redis_timeout,
            board=self.board,
            on_fatal=lambda reason: self.fail(CLUSTER, reason),
        )
        try:
            self._cluster_adopted = await cluster.start()
        except ManagerError as exc:
            await cluster.aclose()
            raise StartupFailed(f"could not join the managers on Redis: {exc.message}") from None
        self._stage("cluster", cluster.aclose)
        self.cluster = cluster

    async def _watch_livekit(self) -> None:
        # After the sessions stage, so it closes before it: the sessions ended at shutdown are
        # not also ended as "LiveKit lost" if the managed LiveKit is stopped meanwhile.
        watch = LiveKitWatch(
            self.gateway,
            board=self.board,
            on_lost=self.supervisor.livekit_lost,
            on_back=self.supervisor.livekit_back,
            interval=self.settings.livekit_probe_interval,
            managed=self.livekit_server,
        )
        watch.start()
        self._stage("livekit watch", watch.aclose)

    async def _start_health_monitor(self) -> None:
        settings = self.settings
        # A pool of its own, at most health_concurrency checks at once: slow or dead
        # registrations cannot take the connections join-room needs. Its connections are kept
        # alive between checks, so a check every 0.5 s opens no new one.
        http = health_session(
            concurrency=settings.health_concurrency, resolver=self.egress.resolver
        )
        self._stage("health client", http.close)
        client = MicroserviceClient(
            http,
            DispatchPolicy(timeout=settings.health_timeout, attempts=1, backoff=0.0),
            guard=self.egress,
            secrets=self.registry.signing_secrets,
        )
        self.health = HealthMonitor(
            self.registry,
            client,
            interval=settings.health_interval,
            timeout=settings.health_timeout,
            on_results=self._health_checked,
            concurrency=settings.health_concurrency,
            should_check=lambda: self.cluster is None or self.cluster.leads_health_checks,
        )
        if self.cluster is not None:
            self.cluster.bus.health_checked = self.supervisor.health_checked
        await self.health.start()
        self._stage("health monitor", self.health.aclose)

    def _health_checked(self, results: HealthResults) -> None:
        self.supervisor.health_checked(results)
        if self.cluster is not None:
            self.cluster.bus.share_health(results)

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
        server = ManagedLiveKitServer(
            config, restart_max_backoff=settings.livekit_restart_max_backoff
        )
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

    def health_problems(self) -> list[Problem]:
        """What keeps the manager from serving now; empty when it can."""
        problems = self.board.problems()
        if self.draining and not self.board.is_down(SUPERVISOR):
            problems.insert(0, Problem(SUPERVISOR, "shutting down", self.draining))
        return problems

    def drain(self) -> None:
        """Stop taking sessions and end the event streams, so in-flight HTTP can finish."""
        self.draining = self.draining or now_rfc3339()
        if hasattr(self, "supervisor"):
            self.supervisor.drain()
        if hasattr(self, "events"):
            self.events.close()

    async def aclose(self) -> None:
        """Tear down in reverse order of start; safe to call twice."""
        stack, self._stack = self._stack, AsyncExitStack()
        await stack.aclose()
