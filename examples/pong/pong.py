"""Pong microservice: in every session it joins, answers each b"ping" data packet with b"pong",
sent reliably to the sender (to the room while LiveKit has not yet announced the sender). It
logs how loud the first seconds of each participant's audio were ("heard audio"), and with
--tone sounds a sine of its own.
Written with session_manager.sdk alone.

Run from the repository root with `python -m examples.pong` or `python examples/pong/pong.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import time
from array import array
from collections.abc import Coroutine, Sequence
from typing import Any

from livekit import rtc

from session_manager.sdk import (
    API_KEY_ENV,
    JoinedSession,
    MicroserviceRunner,
    RegistrationError,
    SessionHandler,
    add_service_arguments,
    configure_logging,
    runner_options,
)

logger = logging.getLogger("examples.pong")

PING = b"ping"
PONG = b"pong"


# A steady sine tone published as the service's microphone (--tone): what the console's Try
# page plays, so its test can hear that a service's audio reaches the browser.
SAMPLE_RATE = 48_000
FRAME_SAMPLES = SAMPLE_RATE // 100  # 10 ms frames, what WebRTC's audio pipeline works in
AMPLITUDE = 0.3 * 32767  # well above silence, well below clipping


def tone_frame(hz: int, first_sample: int) -> rtc.AudioFrame:
    """10 ms of a `hz` sine wave, mono 16-bit, continuing from sample `first_sample`."""
    step = 2 * math.pi * hz / SAMPLE_RATE
    samples = array(
        "h", (int(AMPLITUDE * math.sin(step * (first_sample + i))) for i in range(FRAME_SAMPLES))
    )
    return rtc.AudioFrame(samples.tobytes(), SAMPLE_RATE, 1, FRAME_SAMPLES)


async def play_tone(room: rtc.Room, hz: int) -> None:
    """Publish a microphone track to `room` and keep it sounding `hz` until cancelled.
    `capture_frame` waits while the source's buffer is full, which paces the loop in real time."""
    source = rtc.AudioSource(SAMPLE_RATE, 1)
    track = rtc.LocalAudioTrack.create_audio_track("tone", source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    await room.local_participant.publish_track(track, options)
    sample = 0
    try:
        while True:
            await source.capture_frame(tone_frame(hz, sample))
            # A second of an integer hz is whole cycles: wrap there, and never jump.
            sample = (sample + FRAME_SAMPLES) % SAMPLE_RATE
    finally:
        await source.aclose()


HEAR_SECONDS = 2.0  # how much of each participant's audio pong listens to before it says


async def hear(track: rtc.Track, identity: str) -> None:
    """Listen to the first HEAR_SECONDS of a participant's audio track and log how loud it was
    (RMS, 0 to 1): what shows that a browser's microphone reaches a service."""
    stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
    squares, samples = 0, 0
    try:
        async for event in stream:
            values = array("h", bytes(event.frame.data))
            squares += sum(value * value for value in values)
            samples += len(values)
            if samples >= SAMPLE_RATE * HEAR_SECONDS:
                break
    finally:
        await stream.aclose()
    rms = math.sqrt(squares / samples) / 32768 if samples else 0.0
    logger.info(
        "heard audio",
        extra={"participant": identity, "seconds": samples / SAMPLE_RATE, "rms": round(rms, 4)},
    )


class PongHandler(SessionHandler):
    def __init__(self, tone_hz: int | None = None) -> None:
        self.tone_hz = tone_hz

    async def on_join(self, session: JoinedSession) -> None:
        # LiveKit calls event callbacks synchronously and refuses coroutine callbacks, so the
        # callback only queues the packet; this task (owned and cancelled by the SDK) answers.
        packets: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
        enqueue = packets.put_nowait
        session.room.on("data_received", enqueue)
        # The tone, when asked for, and the listening to each audio track are this session's own
        # tasks: cancelled and awaited with it.
        tasks: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and (error := task.exception()) is not None:
                logger.warning("audio task failed", extra={"task": task.get_name(), "error": error})

        def start(name: str, work: Coroutine[Any, Any, None]) -> None:
            task = asyncio.create_task(work, name=name)
            tasks.add(task)
            task.add_done_callback(finished)

        if self.tone_hz:
            start("tone", play_tone(session.room, self.tone_hz))

        def on_track(
            track: rtc.Track, _publication: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
        ) -> None:
            if track.kind == rtc.TrackKind.KIND_AUDIO:
                start(f"hear {who.identity}", hear(track, who.identity))

        session.room.on("track_subscribed", on_track)
        logger.info("pong ready", extra={"session_id": session.session_id})
        try:
            while True:
                packet = await packets.get()
                await self.answer(session.room, packet)
        finally:
            session.room.off("data_received", enqueue)
            session.room.off("track_subscribed", on_track)
            running = list(tasks)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def answer(self, room: rtc.Room, packet: rtc.DataPacket) -> bool:
        """Reply b"pong" to the sender of a b"ping" packet; True when a reply was sent."""
        if packet.data != PING:
            return False
        # LiveKit announces a participant that publishes no track to the others only every few
        # seconds; until then its packets arrive with no sender. Rather than drop those pings,
        # answer them to the whole room: the sender is in it, and nobody else asked.
        sender = packet.participant.identity if packet.participant is not None else None
        destinations = [sender] if sender else []
        try:
            # Same topic as the ping, so a client that filters by topic sees the answer.
            await room.local_participant.publish_data(
                PONG, reliable=True, destination_identities=destinations, topic=packet.topic or ""
            )
        except Exception:
            # One failed reply (e.g. the sender just left) must not end the session's loop.
            logger.exception("pong reply failed", extra={"destination": sender or "room"})
            return False
        logger.debug("answered ping", extra={"destination": sender or "room"})
        return True

    async def on_leave(self, session: JoinedSession, reason: str) -> None:
        logger.info("pong left", extra={"session_id": session.session_id, "reason": reason})

    async def on_session_started(self, session: JoinedSession) -> None:
        """A warm pool's room pong joined ahead was handed to a user: pong answers anyone, so
        it only says whose session it is now."""
        logger.info(
            "pong session started",
            extra={"session_id": session.session_id, "user_identity": session.user_identity},
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pong", description='Microservice that answers b"ping" data packets with b"pong".'
    )
    # The SDK's flags (--service-id, --port, --manager-url, --log-level, …), with pong's
    # defaults; SESSION_MANAGER_URL, when set, is --manager-url's.
    add_service_arguments(parser, service_id="pong-service-1", port=8001)
    parser.add_argument("--type", default="PONG", help="service type sent in the metadata")
    parser.add_argument(
        "--health-interval",
        type=float,
        help="seconds between the manager's health checks of this service, 0.5 to 3600, sent "
        "in the metadata (default: the manager's health_interval)",
    )
    parser.add_argument(
        "--stall-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="for tests: block the event loop every SECONDS (default 0: never)",
    )
    parser.add_argument(
        "--stall-for",
        type=float,
        default=1.5,
        metavar="SECONDS",
        help="for tests: how long each stall of --stall-every lasts (default 1.5)",
    )
    parser.add_argument(
        "--tone",
        type=tone_hz,
        metavar="HZ",
        help="publish a microphone track sounding a sine of HZ (20 to 20000) in every session",
    )
    args = parser.parse_args(argv)
    # The manager's API key (scope `service`) comes from the environment, not argv, where
    # every user of the machine could read it.
    args.api_key = os.environ.get(API_KEY_ENV) or None
    return args


def tone_hz(text: str) -> int:
    hz = int(text)
    if not 20 <= hz <= 20_000:
        raise argparse.ArgumentTypeError("a tone is 20 to 20000 Hz")
    return hz


def metadata(args: argparse.Namespace) -> dict[str, object]:
    """The registration metadata: the type, and the health interval when one was given."""
    if args.health_interval is None:
        return {"type": args.type}
    return {"type": args.type, "health_interval": args.health_interval}


async def stall(every: float, seconds: float) -> None:
    """Block the whole event loop for `seconds` every `every` seconds: a slow but alive
    service, for the tests that check it is not failed over."""
    while True:
        await asyncio.sleep(every)
        logger.info("stalling the event loop", extra={"seconds": seconds})
        time.sleep(seconds)  # noqa: ASYNC251 -- blocking the loop is the point


async def serve(runner: MicroserviceRunner, stall_every: float, stall_for: float) -> None:
    """Run until SIGINT/SIGTERM, stalling the loop now and then if asked to."""
    staller = asyncio.create_task(stall(stall_every, stall_for)) if stall_every > 0 else None
    try:
        await runner.run_until_signal()
    finally:
        if staller is not None:
            staller.cancel()
            await asyncio.gather(staller, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    runner = MicroserviceRunner(
        args.service_id,
        PongHandler(args.tone),
        metadata=metadata(args),
        api_key=args.api_key,
        **runner_options(args),
    )
    try:
        asyncio.run(serve(runner, args.stall_every, args.stall_for))
    except RegistrationError as error:
        logger.error("registration refused", extra={"error": str(error)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
