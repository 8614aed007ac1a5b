"""The aiohttp application: routes, the error middleware, and the daemon's lifetime as one
cleanup context (started before the first request, closed after the last)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from session_manager.api.cors import CorsPolicy
from session_manager.api.errors import error_middleware
from session_manager.api.routes import DAEMON, routes
from session_manager.commands import GetSession
from session_manager.config import Settings
from session_manager.daemon import Daemon
from session_manager.errors import NotFound
from session_manager.events import SessionPresence, add_event_routes
from session_manager.session.record import JsonDict
from session_manager.session.states import SessionStatus


def create_app(settings: Settings, *, api_port: int | None = None) -> web.Application:
    """`api_port` is the port this API really listens on: the managed LiveKit posts its
    webhooks there. It defaults to `settings.port`."""
    cors = CorsPolicy(settings.cors_allow_origins)
    app = web.Application(
        middlewares=[cors.middleware(), error_middleware], client_max_size=settings.max_body_bytes
    )
    app.on_response_prepare.append(cors.response_hook())
    app.add_routes(routes)

    async def daemon_context(app: web.Application) -> AsyncIterator[None]:
        daemon = Daemon(settings, api_port=api_port if api_port is not None else settings.port)
        await daemon.start()
        app[DAEMON] = daemon
        yield
        await daemon.aclose()

    async def stop_taking_sessions(app: web.Application) -> None:
        app[DAEMON].drain()

    async def session_presence(request: web.Request, session_id: str) -> SessionPresence:
        try:
            view: JsonDict = await request.app[DAEMON].supervisor.ask(
                lambda reply: GetSession(session_id, reply)
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
    )
    app.cleanup_ctx.append(daemon_context)
    app.on_shutdown.append(stop_taking_sessions)
    return app
