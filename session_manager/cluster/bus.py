"""The cluster bus owns its subscriber loop: one Redis pub/sub channel every manager process
listens on, carrying LiveKit webhooks and session commands to the process that owns the session,
and the answers back.

Any process answers any request. A command for a session another process owns (delete it, add or
remove a service) is published with a request id; the owner runs it and publishes the answer for
the asker. Pub/sub delivers at most once and only to processes listening then, so the asker
publishes again every `lease_ttl` until it is answered (an owner that died is replaced within
about a lease; by the asker itself, maybe, which then runs the command) and gives up after a
bounded time with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from session_manager import errors
from session_manager.clock import parse_rfc3339, rfc3339
from session_manager.commands import Access
from session_manager.errors import ManagerError, StoreUnavailable, Unhealthy
from session_manager.livekit.webhooks import RoomEvent
from session_manager.session.record import JsonDict
from session_manager.supervision import cancel_and_wait, watch

log = logging.getLogger(__name__)

COMMAND_ANSWER_TIMEOUT = 30.0  # the owner's own bound on running one command
RESUBSCRIBE_BACKOFF = (0.1, 2.0)  # first and longest wait before listening again


@dataclass(frozen=True)
class SessionCommand:
    """A command for a session, as it travels between processes."""

    op: str  # "delete", "add_service", "remove_service"
    session_id: str
    argument: str | None
    access: Access


# What a process that owns a session does with a command for it; None: it does not own it.
CommandRunner = Callable[[SessionCommand], "asyncio.Future[JsonDict] | None"]
WebhookSink = Callable[[RoomEvent], None]
RegistrySink = Callable[[str, str | None], None]  # service id, its health where it changed
HealthSink = Callable[[list[tuple[str, str | None]]], None]  # (service id, error) per check
PresenceSeenSink = Callable[[str], None]  # an instance connected to another process
PresenceLostSink = Callable[[str, datetime], None]  # another process declared it lost

# The errors an owner may answer with, rebuilt by name on the asking side.
_ERRORS: dict[str, type[ManagerError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, ManagerError)
}


class ClusterBus:
    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        node_id: str,
        timeout: float,
        resend_every: float,
        give_up_after: float,
        on_fatal: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._on_fatal = on_fatal
        self._redis = redis
        self._channel = f"{prefix}bus"
        self.node_id = node_id
        self._timeout = timeout
        self._resend_every = resend_every
        self._give_up_after = give_up_after
        self._waiting: dict[str, asyncio.Future[JsonDict]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # answers being run and published
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self.run_command: CommandRunner = lambda command: None
        self.deliver_webhook: WebhookSink = lambda event: None
        self.registry_changed: RegistrySink = lambda service_id, status: None
        self.health_checked: HealthSink = lambda results: None
        self.presence_seen: PresenceSeenSink = lambda service_id: None
        self.presence_lost: PresenceLostSink = lambda service_id, gone_at: None

    async def start(self, timeout: float) -> None:
        self._listener = asyncio.create_task(self._listen(), name="cluster-bus")
        watch(self._listener, self._listener_died)
        try:
            async with asyncio.timeout(timeout):
                await self._listening.wait()
        except TimeoutError:
            await self.aclose()
            raise StoreUnavailable("Redis pub/sub did not answer") from None

    async def aclose(self) -> None:
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(Unhealthy("the session manager is shutting down"))
        await cancel_and_wait([*self._tasks, *([self._listener] if self._listener else [])])
        self._listener = None

    def _listener_died(self, error: BaseException | None) -> None:
        """The loop that hears the other processes is gone (a bug: Redis errors are retried):
        whoever waits for an answer is told now, and the process exits (crash-only)."""
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(Unhealthy("the cluster bus stopped"))
        self._on_fatal(f"cluster bus loop ended: {type(error).__name__ if error else 'returned'}")

    # sending ----------------------------------------------------------------------------------

    async def share_webhook(self, event: RoomEvent) -> None:
        await self._publish({"kind": "webhook", "event": _event_fields(event)})

    def share_health(self, results: list[tuple[str, str | None]]) -> None:
        """The health checks this process made (it leads them): every other process applies
        the same results. Sent by a task the bus owns; a lost message costs one round."""
        message = {"kind": "health", "from": self.node_id, "results": results}
        self._send_in_background(message)

    def _send_in_background(self, message: JsonDict) -> None:
        """Publish from a task the bus owns (cancelled and awaited when it closes)."""
        task = asyncio.create_task(self._send_quietly(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_quietly(self, message: JsonDict) -> None:
        try:
            await self._publish(message)
        except StoreUnavailable as exc:
            log.warning("cluster message not sent", extra={"error": exc.message})

    def share_presence(self, state: str, service_id: str, gone_at: datetime | None) -> None:
        """An SDK instance's presence connection was `seen` here (the others cancel their grace
        for it) or it was declared `lost` here (the others move their sessions off it). Sent by
        a task the bus owns; a lost message leaves that to the health checks."""
        message = {
            "kind": "presence",
            "from": self.node_id,
            "state": state,
            "service_id": service_id,
            "gone_at": rfc3339(gone_at) if gone_at is not None else None,
        }
        self._send_in_background(message)

    async def announce_registration(self, service_id: str, status: str | None) -> None:
        """This process changed a registration in the shared store: the others read it."""
        message = {"kind": "registry", "from": self.node_id, "service_id": service_id}
        await self._publish({**message, "status": status})

    async def ask_owner(self, command: SessionCommand) -> JsonDict:
        """Have the process that owns the session run `command`; its answer, or its error."""
        request_id = uuid.uuid4().hex
        answer: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        message = {
            "kind": "command",
            "id": request_id,
            "from": self.node_id,
            "op": command.op,
            "session_id": command.session_id,
            "argument": command.argument,
            "access": {"owner": command.access.owner, "admin": command.access.admin},
        }
        try:
            async with asyncio.timeout(self._give_up_after):
                while True:
                    # The owner may have died and this process adopted the session meanwhile:
                    # its own commands never come back to it over the bus, so it runs them here.
                    here = self.run_command(command)
                    if here is not None:
                        break
                    await self._publish(message)
                    done, _ = await asyncio.wait([answer], timeout=self._resend_every)
                    if done:
                        return answer.result()
        except TimeoutError:
            raise Unhealthy(
                f"the process owning session {command.session_id} did not answer"
            ) from None
        finally:
            self._waiting.pop(request_id, None)
        try:
            async with asyncio.timeout(COMMAND_ANSWER_TIMEOUT):
                return await here
        except TimeoutError:
            raise Unhealthy("the session did not answer") from None

    async def _publish(self, message: JsonDict) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.publish(self._channel, orjson.dumps(message))
        except (RedisError, OSError, TimeoutError) as exc:
            what = type(exc).__name__
            raise StoreUnavailable(f"Redis could not carry a message: {what}") from None

    # receiving --------------------------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = RESUBSCRIBE_BACKOFF[0]
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    async with asyncio.timeout(self._timeout):
                        await pubsub.subscribe(self._channel)
                    self._listening.set()
                    backoff = RESUBSCRIBE_BACKOFF[0]
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None:
                            self._received(message.get("data"))
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning(
                    "cluster bus lost Redis; listening again",
                    extra={"error": type(exc).__name__, "retry_in": backoff},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RESUBSCRIBE_BACKOFF[1])

    def _received(self, data: Any) -> None:
        try:
            message = orjson.loads(data)
            kind = message["kind"]
            if kind == "webhook":
                self.deliver_webhook(RoomEvent(**message["event"]))
            elif kind == "command" and message["from"] != self.node_id:
                self._serve(message)
            elif kind == "health" and message["from"] != self.node_id:
                self.health_checked([(str(s), e) for s, e in message["results"]])
            elif kind == "presence" and message["from"] != self.node_id:
                self._presence(message)
            elif kind == "registry" and message["from"] != self.node_id:
                self.registry_changed(message["service_id"], message.get("status"))
            elif kind == "answer" and message["to"] == self.node_id:
                self._answered(message)
        except Exception:
            log.warning("cluster bus message not understood", exc_info=True)

    def _presence(self, message: JsonDict) -> None:
        service_id = str(message["service_id"])
        if message["state"] == "seen":
            self.presence_seen(service_id)
        elif message["state"] == "lost":
            self.presence_lost(service_id, parse_rfc3339(str(message["gone_at"])))

    def _serve(self, message: JsonDict) -> None:
        access = message["access"]
        command = SessionCommand(
            message["op"],
            message["session_id"],
            message.get("argument"),
            Access(owner=access.get("owner"), admin=bool(access.get("admin"))),
        )
        outcome = self.run_command(command)
        if outcome is None:
            return  # not ours: its owner answers
        task = asyncio.create_task(self._answer(message["id"], message["from"], outcome))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, request_id: str, to: str, outcome: asyncio.Future[JsonDict]) -> None:
        answer: JsonDict = {"kind": "answer", "id": request_id, "to": to}
        try:
            async with asyncio.timeout(COMMAND_ANSWER_TIMEOUT):
                answer["result"] = await outcome
        except ManagerError as exc:
            answer["error"] = {"type": type(exc).__name__, "message": exc.message}
        except TimeoutError:
            answer["error"] = {"type": "Unhealthy", "message": "the session did not answer"}
        try:
            await self._publish(answer)
        except StoreUnavailable as exc:  # the asker publishes again
            log.warning("cluster answer not sent", extra={"error": exc.message})

    def _answered(self, message: JsonDict) -> None:
        waiter = self._waiting.get(message["id"])
        if waiter is None or waiter.done():
            return
        error = message.get("error")
        if error is None:
            waiter.set_result(message["result"])
            return
        waiter.set_exception(_rebuilt(error))


def _rebuilt(error: JsonDict) -> ManagerError:
    """The owner's error, as the asker raises it (same class, so the same status and code)."""
    kind = _ERRORS.get(str(error.get("type", "")), ManagerError)
    rebuilt = kind.__new__(kind)
    ManagerError.__init__(rebuilt, str(error.get("message", "")))  # any class's own arguments
    return rebuilt


def _event_fields(event: RoomEvent) -> JsonDict:
    return {
        "kind": event.kind,
        "room_name": event.room_name,
        "event_id": event.event_id,
        "created_at": event.created_at,
        "identity": event.identity,
        "participant_sid": event.participant_sid,
        "role": event.role,
        "attributes": event.attributes,
    }
