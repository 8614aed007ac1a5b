"""Presence: the board owns, in the daemon's loop, the one live connection of each SDK instance
and the grace timers of the ones that dropped; a connection lost without a goodbye is a death.

An SDK instance keeps one WebSocket open to `GET /api/v1/microservices/{service_id}/presence`
for as long as it runs. Both ends send a small `beat` every `interval`; an end that hears
nothing for `timeout` takes the other as gone (a vanished host sends no FIN). The rules:

- one connection per instance: a new one replaces the old (closed with `REPLACED`);
- a connection that ends with the service's own close frame of code 1000 (its goodbye, sent
  after it drained) or while its registration is draining is no death;
- any other end (the kernel closed the socket of a killed process, the beats stopped) starts
  a `grace`; a new connection of the same instance within it, here or on another manager of
  the cluster, cancels it; at its end the instance is lost: `on_lost(service_id, gone_at)`;
- while the manager shuts down (`aclose`) it closes the connections itself and judges none;
  a new process judges only the connections it has seen (an instance that never reconnects
  is left to the health checks).

With several managers on one Redis, `share` tells the others of a connection seen (they
cancel their grace for it) and of a verdict (they act on their own sessions); `remote_seen`
and `remote_lost` are how they hear it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from aiohttp import WSCloseCode, web

from session_manager.clock import utc_now

log = logging.getLogger(__name__)

REPLACED: Final = 4000  # close code: another connection of the same instance took over
GOING_AWAY: Final = int(WSCloseCode.GOING_AWAY)  # the manager shuts down
MAX_MESSAGE: Final = 1024  # bytes: a beat is a dozen; anything longer closes the connection
CLOSE_TIMEOUT: Final = 1.0  # seconds to wait for the other end's close frame
BEAT: Final = '{"type":"beat"}'

LostSink = Callable[[str, datetime], None]  # service id, when its connection went
ShareSink = Callable[[str, str, datetime | None], None]  # "seen" | "lost", service id, gone_at


@dataclass(frozen=True)
class PresencePolicy:
    interval: float = 0.25  # seconds between beats, each way
    timeout: float = 0.75  # seconds of silence that end a connection
    grace: float = 0.3  # seconds a dropped instance has to reconnect before it is lost

    def hello(self) -> dict[str, object]:
        """The first message of a connection: the SDK beats and listens by these."""
        return {"type": "hello", "interval": self.interval, "timeout": self.timeout}


@dataclass
class _Connection:
    service_id: str
    socket: web.WebSocketResponse
    replaced: bool = False  # another connection took over: its end says nothing


@dataclass
class _Grace:
    gone_at: datetime
    handle: asyncio.TimerHandle
    reason: str = field(default="connection lost")


class PresenceBoard:
    """Owns the live presence connections and the grace timers, in the daemon's loop."""

    def __init__(
        self,
        policy: PresencePolicy,
        *,
        on_lost: LostSink,
        is_draining: Callable[[str], bool] = lambda service_id: False,
        share: ShareSink | None = None,
    ) -> None:
        self.policy = policy
        self._on_lost = on_lost
        self._is_draining = is_draining
        self._share = share
        self._live: dict[str, _Connection] = {}
        self._graces: dict[str, _Grace] = {}
        self._closing = False
        self.losses = 0  # instances declared lost by this process (tests, logs)

    @property
    def closing(self) -> bool:
        return self._closing

    def connected(self) -> frozenset[str]:
        """Ids of the instances with a live connection to this process."""
        return frozenset(self._live)

    def pending(self) -> frozenset[str]:
        """Ids of the instances in their grace."""
        return frozenset(self._graces)

    # one connection's life ---------------------------------------------------------------

    async def serve(self, service_id: str, socket: web.WebSocketResponse) -> None:
        """Run one prepared connection until it ends, then judge how it ended."""
        connection = _Connection(service_id, socket)
        old = self._live.get(service_id)
        self._live[service_id] = connection
        self._cancel_grace(service_id)
        if self._share is not None:
            self._share("seen", service_id, None)
        if old is not None:
            old.replaced = True
            await _close(old.socket, REPLACED, b"replaced by a newer connection")
        log.info("presence connected", extra={"service_id": service_id})
        goodbye = False
        try:
            goodbye = await self._converse(socket)
        except asyncio.CancelledError:
            # A server that cancels the handler of a closed connection may do so while the
            # goodbye is being answered: the service's close frame left its code.
            goodbye = socket.close_code == WSCloseCode.OK
            raise
        finally:
            if self._live.get(service_id) is connection:
                del self._live[service_id]
            if not connection.replaced:
                self._ended(service_id, goodbye)
            await _close(socket, GOING_AWAY if self._closing else WSCloseCode.OK, b"")

    async def _converse(self, socket: web.WebSocketResponse) -> bool:
        """Beat and listen until the connection ends; True when the service said goodbye
        (its close frame with code 1000)."""
        policy = self.policy
        await socket.send_json(policy.hello())
        beats = asyncio.create_task(self._beat(socket), name="presence beats")
        try:
            while True:
                try:
                    message = await socket.receive(timeout=policy.timeout)
                except TimeoutError:
                    return False  # silence: the host or its network is gone
                if message.type is web.WSMsgType.CLOSE:
                    # 1000 is the SDK's goodbye; any other code (it is reconnecting) is not.
                    return bool(message.data == WSCloseCode.OK)
                if message.type in (
                    web.WSMsgType.CLOSING,
                    web.WSMsgType.CLOSED,
                    web.WSMsgType.ERROR,
                ):
                    return False
                # Anything else (beats) only proves the instance is there.
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)

    async def _beat(self, socket: web.WebSocketResponse) -> None:
        while not socket.closed:
            await asyncio.sleep(self.policy.interval)
            try:
                await socket.send_str(BEAT)
            except (ConnectionError, RuntimeError):
                return  # the reader sees the end and judges it

    def _ended(self, service_id: str, goodbye: bool) -> None:
        if self._closing:
            return  # our own shutdown closed it: no verdict on anyone
        if goodbye or self._is_draining(service_id):
            log.info("presence closed by the service", extra={"service_id": service_id})
            return
        log.warning("presence lost; grace starts", extra={"service_id": service_id})
        self._start_grace(service_id, utc_now())

    # verdicts ----------------------------------------------------------------------------

    def _start_grace(self, service_id: str, gone_at: datetime) -> None:
        self._cancel_grace(service_id)
        handle = asyncio.get_running_loop().call_later(
            self.policy.grace, self._grace_over, service_id
        )
        self._graces[service_id] = _Grace(gone_at, handle)

    def _cancel_grace(self, service_id: str) -> None:
        grace = self._graces.pop(service_id, None)
        if grace is not None:
            grace.handle.cancel()
            log.info("presence back within its grace", extra={"service_id": service_id})

    def _grace_over(self, service_id: str) -> None:
        grace = self._graces.pop(service_id, None)
        if grace is None or self._closing or service_id in self._live:
            return
        self.losses += 1
        log.warning("service process lost", extra={"service_id": service_id})
        if self._share is not None:
            self._share("lost", service_id, grace.gone_at)
        self._on_lost(service_id, grace.gone_at)

    def remote_seen(self, service_id: str) -> None:
        """Another manager of the cluster holds a new connection of this instance."""
        self._cancel_grace(service_id)

    def remote_lost(self, service_id: str, gone_at: datetime) -> None:
        """Another manager declared this instance lost: act on this process's sessions, unless
        the instance is connected here now (it came back here after that verdict)."""
        if self._closing or service_id in self._live:
            return
        self._on_lost(service_id, gone_at)

    # shutdown ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """The manager shuts down: judge nothing from now on, and close every connection
        (the SDKs reconnect to the next process). Idempotent; bounded by CLOSE_TIMEOUT."""
        self._closing = True
        for grace in self._graces.values():
            grace.handle.cancel()
        self._graces.clear()
        live = list(self._live.values())
        if live:
            await asyncio.gather(
                *(_close(c.socket, GOING_AWAY, b"manager shutting down") for c in live)
            )


async def _close(socket: web.WebSocketResponse, code: int, message: bytes) -> None:
    """Close, bounded: the other end may be gone without a word."""
    if socket.closed:
        return
    try:
        await asyncio.wait_for(socket.close(code=code, message=message), CLOSE_TIMEOUT)
    except (TimeoutError, ConnectionError, RuntimeError):
        pass
