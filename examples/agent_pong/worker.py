"""agent_pong: a `livekit-agents` worker registered as `agent_name="pong"` (AGENT_PONG_NAME)
that, in every room it is dispatched to, answers each b"ping" data packet with b"pong".

No model, no cloud service: only LiveKit. Configured from the environment, never from argv
read at import time (livekit-agents starts its job processes by importing this module again):

- LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET: the LiveKit server the worker registers with
- AGENT_PONG_NAME: the agent name (default "pong"): what `agent:NAME` in required_services names
- AGENT_PONG_HEALTH_PORT: the worker's own HTTP health port (default 8081): two workers on one
  machine need two ports

Run: `python -m examples.agent_pong start`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from livekit import rtc
from livekit.agents import JobContext, WorkerOptions, cli

PING = b"ping"
PONG = b"pong"
DEFAULT_NAME = "pong"
DEFAULT_HEALTH_PORT = 8081

log = logging.getLogger("agent_pong")


def session_of(metadata: str) -> dict[str, object]:
    """The job's metadata as the session manager writes it (JSON: session_id, user_identity,
    session_metadata); anything else (a dispatch made by hand) reads as empty."""
    try:
        parsed = json.loads(metadata) if metadata else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


async def entrypoint(ctx: JobContext) -> None:
    session = session_of(ctx.job.metadata)
    # One fixed line per job, values in the text too: the tests read it from the worker's log.
    print(
        f"agent_pong job room={ctx.room.name} session_id={session.get('session_id')} "
        f"metadata={json.dumps(session.get('session_metadata'), sort_keys=True)}",
        flush=True,
    )
    await ctx.connect()
    room = ctx.room
    tasks: set[asyncio.Task[None]] = set()

    async def answer(packet: rtc.DataPacket) -> None:
        sender = packet.participant.identity if packet.participant is not None else None
        try:
            await room.local_participant.publish_data(
                PONG,
                reliable=True,
                destination_identities=[sender] if sender else [],
                topic=packet.topic or "",
            )
        except Exception:
            log.exception("pong could not be sent")

    def on_data(packet: rtc.DataPacket) -> None:
        if packet.data == PING:
            task = asyncio.create_task(answer(packet))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    room.on("data_received", on_data)


def _no_load(*_: object) -> float:
    """A pong costs nothing: the worker's load is not the machine's CPU (by default a worker
    above 70 % CPU takes no jobs, which a busy test machine reaches)."""
    return 0.0


def options() -> WorkerOptions:
    return WorkerOptions(
        entrypoint_fnc=entrypoint,
        agent_name=os.environ.get("AGENT_PONG_NAME", DEFAULT_NAME),
        port=int(os.environ.get("AGENT_PONG_HEALTH_PORT", str(DEFAULT_HEALTH_PORT))),
        num_idle_processes=1,
        load_fnc=_no_load,
    )


def main() -> None:
    cli.run_app(options())
