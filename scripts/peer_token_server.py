"""The simplest thing a user could write instead of the manager, for the create-session benchmark.

A minimal aiohttp app with one route, `POST /api/v1/create-session`: CreateRoom on LiveKit
(livekit-api), then a client token minted for it, answered as the manager answers a session
without services (`status: "Ready"`). No store, no events, no actors, no limits: the floor a
hand-written token server sets, which the manager's tail is measured against
(`scripts/bench_create_session.py --peer`).

    .venv/bin/python scripts/peer_token_server.py --port 8090   # LIVEKIT_URL/KEY/SECRET from env

It runs on uvloop when that is installed, as the manager does, so the two differ only by what
they do per request. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from datetime import timedelta

import aiohttp
from aiohttp import web
from livekit import api

HOST = "127.0.0.1"
ROOM_EMPTY_TIMEOUT = 3600  # as the benchmark's own rooms: nothing expires during a run
TOKEN_TTL = timedelta(hours=6)
LIVEKIT_TIMEOUT = 10.0
LIVEKIT_KEY: web.AppKey[api.LiveKitAPI] = web.AppKey("livekit", api.LiveKitAPI)


async def create_session(request: web.Request) -> web.Response:
    body = await request.json()
    identity = str(body["user_identity"])
    session_id = str(uuid.uuid4())
    room = f"peer-{session_id}"
    livekit = request.app[LIVEKIT_KEY]
    await livekit.room.create_room(
        api.CreateRoomRequest(
            name=room,
            metadata=json.dumps({"session_id": session_id, "user_identity": identity}),
            empty_timeout=ROOM_EMPTY_TIMEOUT,
        )
    )
    token = (
        api.AccessToken(os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"])
        .with_identity(identity)
        .with_ttl(TOKEN_TTL)
        .with_grants(api.VideoGrants(room_join=True, room=room, can_publish_data=True))
        .to_jwt()
    )
    return web.json_response(
        {
            "session_id": session_id,
            "room_name": room,
            "access_token": token,
            "livekit_url": os.environ["LIVEKIT_URL"],
            "status": "Ready",
        }
    )


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


async def livekit_client(app: web.Application):  # type: ignore[no-untyped-def]
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=LIVEKIT_TIMEOUT))
    app[LIVEKIT_KEY] = api.LiveKitAPI(
        os.environ["LIVEKIT_URL"],
        os.environ["LIVEKIT_API_KEY"],
        os.environ["LIVEKIT_API_SECRET"],
        session=http,
    )
    yield
    await app[LIVEKIT_KEY].aclose()
    await http.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.cleanup_ctx.append(livekit_client)
    app.router.add_post("/api/v1/create-session", create_session)
    app.router.add_get("/health", health)
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        web.run_app(app, host=HOST, port=args.port, print=None, loop=runner.get_loop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
