"""The instance's presence at the manager: one WebSocket, held from a thread of its own.

The presence client owns a thread and the event loop in it. That loop only holds the connection
to `GET /api/v1/microservices/{service_id}/presence`: it answers the manager's beats with its
own every `interval` (the manager's `hello` says how often) and reconnects at once when the
connection drops (then with backoff). Run apart from the service's loop, a service whose own
loop stalls for a second or two still beats, so it is not taken for dead; a killed process
takes its socket with it, which the manager sees at once.

`aclose()` says goodbye (a close frame with code 1000) after the runner has drained at the
manager and left its rooms: the manager then moves nothing. A connection closed with any other
code, or lost, is a death to the manager once its grace has run out.

Turned off by `SESSION_MANAGER_PRESENCE=off` or `--no-presence` (then only the manager's health
checks find a dead process).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import aiohttp

logger = logging.getLogger(__name__)

PRESENCE_PATH: Final = "/api/v1/microservices/{service_id}/presence"
GOODBYE: Final = 1000  # close code: the service drained and leaves; the manager moves nothing
RECONNECTING: Final = 4001  # close code: this end gave up on the connection and comes back
REPLACED: Final = 4000  # close code from the manager: a newer connection of this id took over
MAX_MESSAGE: Final = 1024  # bytes; the manager's messages are a few dozen
CONNECT_TIMEOUT: Final = 5.0  # seconds for the upgrade and the manager's hello
CLOSE_TIMEOUT: Final = 1.0  # seconds to wait for the manager's answer to a close frame
STOP_TIMEOUT: Final = 3.0  # seconds `aclose` waits for the thread
BEAT: Final = '{"type":"beat"}'
# Used until the manager's hello says otherwise.
DEFAULT_INTERVAL: Final = 0.25
DEFAULT_TIMEOUT: Final = 0.75


@dataclass(frozen=True)
class PresenceBackoff:
    """Waits between reconnects: none before the first, then doubling up to `longest`."""

    first: float = 0.1
    longest: float = 2.0

    def delays(self) -> Iterator[float]:
        yield 0.0
        delay = self.first
        while True:
            yield delay
            delay = min(delay * 2, self.longest)


class PresenceClient:
    """Owns a thread and its event loop, which hold this instance's presence connection."""

    def __init__(
        self,
        manager_url: str,
        service_id: str,
        *,
        api_key: str | None = None,
        backoff: PresenceBackoff | None = None,
    ) -> None:
        self._url = manager_url.rstrip("/") + PRESENCE_PATH.format(
            service_id=quote(service_id, safe="")
        )
        self._service_id = service_id
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._backoff = backoff or PresenceBackoff()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, name=f"presence {service_id}", daemon=True
        )
        # Touched only from the presence loop (`_request_stop` runs there too).
        self._stop_requested = False
        self._stop: asyncio.Event | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._goodbye: asyncio.Task[Any] | None = None
        self._refused = False
        # Read from any thread: set while a connection is up (tests, logs).
        self.connected = threading.Event()
        self.connections = 0  # connections made so far

    def start(self) -> None:
        self._thread.start()

    async def aclose(self) -> None:
        """Say goodbye and stop the thread (bounded by STOP_TIMEOUT). Idempotent."""
        if not self._thread.is_alive():
            return
        try:
            self._loop.call_soon_threadsafe(self._request_stop)
        except RuntimeError:
            return  # its loop has closed already
        await asyncio.to_thread(self._thread.join, STOP_TIMEOUT)
        if self._thread.is_alive():
            logger.warning("presence thread did not stop in time", extra=self._extra())

    # the presence thread -----------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except Exception:
            logger.exception("presence stopped by an error", extra=self._extra())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _request_stop(self) -> None:
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()
        socket = self._socket
        if socket is not None and not socket.closed and self._goodbye is None:
            self._goodbye = asyncio.create_task(
                socket.close(code=GOODBYE, message=b"goodbye"), name="presence goodbye"
            )

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        if self._stop_requested:
            return
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT)
        async with aiohttp.ClientSession(headers=self._headers, timeout=timeout) as http:
            delays = self._backoff.delays()
            while not self._stop_requested:
                outcome = await self._hold(http)
                if outcome == "replaced":
                    logger.warning(
                        "presence taken over by another process with this service id; "
                        "this one stops keeping it",
                        extra=self._extra(),
                    )
                    break
                if outcome == "held":
                    delays = self._backoff.delays()  # it worked: the next drop retries at once
                delay = next(delays)
                if delay and not self._stop_requested:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                    except TimeoutError:
                        pass
            if self._goodbye is not None:
                await asyncio.gather(self._goodbye, return_exceptions=True)

    async def _hold(self, http: aiohttp.ClientSession) -> str:
        """One connection, from the upgrade to its end: `held` (it was up), `replaced` (the
        manager has a newer one), `refused` or `failed` (it never came up)."""
        try:
            socket = await http.ws_connect(
                self._url,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                max_msg_size=MAX_MESSAGE,
                autoclose=True,
                autoping=True,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            # Told once at INFO (a manager without presence, or not knowing this id yet).
            level = logging.DEBUG if self._refused else logging.INFO
            self._refused = True
            logger.log(
                level, "presence refused by the manager", extra=self._extra(status=exc.status)
            )
            return "refused"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.debug("presence could not connect", extra=self._extra(error=type(exc).__name__))
            return "failed"
        self._socket = socket
        try:
            if self._stop_requested:
                self._request_stop()
            return await self._converse(socket)
        finally:
            self._socket = None
            self.connected.clear()
            if self._goodbye is None and not socket.closed:
                try:
                    await asyncio.wait_for(
                        socket.close(code=RECONNECTING, message=b"reconnecting"), CLOSE_TIMEOUT
                    )
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass

    async def _converse(self, socket: aiohttp.ClientWebSocketResponse) -> str:
        interval, timeout = DEFAULT_INTERVAL, DEFAULT_TIMEOUT
        self.connections += 1
        self.connected.set()
        logger.info("presence connected", extra=self._extra())
        beats: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    message = await socket.receive(timeout=timeout)
                except TimeoutError:
                    logger.info("presence: the manager went silent", extra=self._extra())
                    return "held"
                if message.type is aiohttp.WSMsgType.TEXT:
                    hello = _hello(message.data)
                    if hello is not None and beats is None:
                        interval, timeout = hello
                        beats = asyncio.create_task(self._beat(socket, interval))
                    continue
                if message.type is aiohttp.WSMsgType.CLOSE and message.data == REPLACED:
                    return "replaced"
                if message.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    if not self._stop_requested:
                        logger.info("presence lost; reconnecting", extra=self._extra())
                    return "held"
        finally:
            if beats is not None:
                beats.cancel()
                await asyncio.gather(beats, return_exceptions=True)

    async def _beat(self, socket: aiohttp.ClientWebSocketResponse, interval: float) -> None:
        while not socket.closed:
            try:
                await socket.send_str(BEAT)
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                return  # the reader sees the end
            await asyncio.sleep(interval)

    def _extra(self, **values: Any) -> dict[str, Any]:
        return {"service_id": self._service_id, **values}


def _hello(text: str) -> tuple[float, float] | None:
    """The beat interval and silence timeout the manager's hello sets; None for other
    messages (its beats), or a hello with values out of bounds."""
    if '"hello"' not in text:
        return None
    try:
        body = json.loads(text)
        interval, timeout = float(body["interval"]), float(body["timeout"])
    except (ValueError, KeyError, TypeError):
        return None
    if not (0 < interval <= 10 and interval < timeout <= 60):
        return None
    return interval, timeout
