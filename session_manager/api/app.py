"""The aiohttp application: routes, the middlewares, and the daemon's lifetime as one cleanup
context (started before the first request, closed after the last).

Middlewares, outermost first: the request metrics (every answer timed, `api.metrics`), the CORS
preflight (a browser sends no key on one), the error middleware (every refusal below it is an
envelope), then authentication, scopes and the rate limit (`api.auth`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from session_manager.api.auth import KeyTable, RateLimiter, access_of, auth_middleware
from session_manager.api.console import add_console_routes
from session_manager.api.cors import CorsPolicy
from session_manager.api.docs import add_docs_routes
from session_manager.api.errors import error_middleware
from session_manager.api.metrics import http_metrics, watch
from session_manager.api.routes import DAEMON, routes
from session_manager.api_keys import RateLimit
from session_manager.commands import GetSession
from session_manager.config import Settings
from session_manager.daemon import Daemon
from session_manager.errors import NotFound
from session_manager.events import SessionPresence, add_event_routes
from session_manager.metrics import Metrics
from session_manager.session.record import JsonDict
from session_manager.session.states import SessionStatus


def create_app(settings: Settings, *, api_port: int | None = None) -> web.Application:
    """`api_port` is the port this API really listens on: the managed LiveKit posts its
    webhooks there. It defaults to `settings.port`."""
    keys = KeyTable.parse(entry.get_secret_value() for entry in settings.api_keys)
    origins = settings.cors_allow_origins
    if origins is None:  # left at its default: any origin in the open mode, none with keys
        origins = [] if keys.enabled else ["*"]
    cors = CorsPolicy(origins)
    limiter = RateLimiter(RateLimit.parse(settings.rate_limit)) if settings.rate_limit else None
    metrics = Metrics()  # this app's registry: made now, its middleware times every request
    app = web.Application(
        middlewares=[
            http_metrics(metrics),
            cors.middleware(),
            error_middleware,
            auth_middleware(keys, limiter),
        ],
        client_max_size=settings.max_body_bytes,
    )
    app.on_response_prepare.append(cors.response_hook())
    app.add_routes(routes)
    add_docs_routes(app)
    add_console_routes(app)

    async def daemon_context(app: web.Application) -> AsyncIterator[None]:
        port = api_port if api_port is not None else settings.port
        daemon = Daemon(settings, api_port=port, metrics=metrics)
        await daemon.start()
        watch(metrics, daemon)
        app[DAEMON] = daemon
        yield
        await daemon.aclose()

    async def stop_taking_sessions(app: web.Application) -> None:
        daemon = app[DAEMON]
        daemon.drain()
        # Presence connections never end on their own: closed now (and judged as nothing, our
        # own shutdown), so the server need not wait for them.
        if hasattr(daemon, "presence"):
            await daemon.presence.aclose()

    async def session_presence(request: web.Request, session_id: str) -> SessionPresence:
        try:
            # Another key's session is unknown to a client: its stream is 404 too.
            view: JsonDict = await request.app[DAEMON].supervisor.ask(
                lambda reply: GetSession(session_id, reply, access=access_of(request))
            )
        except NotFound:
            return SessionPresence.UNKNOWN
        ended = view["status"] == SessionStatus.TERMINATED.value
        return SessionPresence.ENDED if ended else SessionPresence.LIVE

    add_event_routes(
        app,
        event_log=lambda request: request.app[DAEMON].events,
        session_presence=session_presence,
        keepalive=settings.event_keepalive,
        max_streams=settings.max_event_streams,
    )
    app.cleanup_ctx.append(daemon_context)
    app.on_shutdown.append(stop_taking_sessions)
    return app
