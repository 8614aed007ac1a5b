"""The aiohttp application: routes, the error middleware, and the daemon's lifetime as one
cleanup context (started before the first request, closed after the last)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from session_manager.api.errors import error_middleware
from session_manager.api.routes import DAEMON, routes
from session_manager.config import Settings
from session_manager.daemon import Daemon


def create_app(settings: Settings, *, api_port: int | None = None) -> web.Application:
    """`api_port` is the port this API really listens on: the managed LiveKit posts its
    webhooks there. It defaults to `settings.port`."""
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app.add_routes(routes)

    async def daemon_context(app: web.Application) -> AsyncIterator[None]:
        daemon = Daemon(settings, api_port=api_port if api_port is not None else settings.port)
        await daemon.start()
        app[DAEMON] = daemon
        yield
        await daemon.aclose()

    async def stop_taking_sessions(app: web.Application) -> None:
        app[DAEMON].drain()

    app.cleanup_ctx.append(daemon_context)
    app.on_shutdown.append(stop_taking_sessions)
    return app
