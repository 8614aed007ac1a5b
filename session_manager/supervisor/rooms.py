"""LiveKit's side of the supervisor: webhooks routed to the actor that owns the room (each acted
on once, whichever process or however often LiveKit posts it), sessions ended when LiveKit lost
their rooms, and LiveKit's rooms compared with the live sessions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from session_manager.cluster.node import ClusterNode
from session_manager.errors import ManagerError
from session_manager.livekit.webhooks import RoomEvent
from session_manager.session.deps import SessionDeps, created_by, room_session
from session_manager.session.messages import RoomEventArrived, Terminate
from session_manager.session.states import SessionStatus
from session_manager.supervisor.children import Children
from session_manager.supervisor.offload import Offload

log = logging.getLogger("session_manager.supervisor")  # the supervisor's one logger

SEEN_WEBHOOKS = 10_000  # webhook ids remembered, so one LiveKit sends twice is acted on once


class LiveKitRooms:
    """Owns the webhook ids already acted on, and routes webhooks and LiveKit's outages to the
    supervisor's children; runs on the supervisor's loop."""

    def __init__(
        self,
        children: Children,
        deps: SessionDeps,
        offload: Offload,
        cluster: ClusterNode | None,
    ) -> None:
        self._children = children
        self._deps = deps
        self._offload = offload
        self._cluster = cluster
        self._seen_webhooks: OrderedDict[str, None] = OrderedDict()

    # webhooks ---------------------------------------------------------------------------------

    def webhook(self, event: RoomEvent) -> None:
        """A webhook LiveKit posted to this process."""
        if self._cluster is not None and event.event_id:
            # LiveKit may post each webhook to every process: one acts on it.
            first = self._cluster.first_sight(event.event_id)
            self._offload(first, then=lambda task: self._route_first(event, task))
        else:
            self._route(event)

    def remote_webhook(self, event: RoomEvent) -> None:
        """A webhook another process of the cluster passed on: for a room of ours, or no one's."""
        child = self._children.by_room(event.room_name)
        if child is not None:
            child.actor.tell(RoomEventArrived(event))

    def _route_first(self, event: RoomEvent, first: asyncio.Future[bool]) -> None:
        if not first.cancelled() and first.exception() is None and first.result():
            self._route(event)

    def _route(self, event: RoomEvent) -> None:
        if event.event_id:
            if event.event_id in self._seen_webhooks:
                log.debug("webhook delivered twice; acted on once", extra={"kind": event.kind})
                return
            self._seen_webhooks[event.event_id] = None
            if len(self._seen_webhooks) > SEEN_WEBHOOKS:
                self._seen_webhooks.popitem(last=False)
        child = self._children.by_room(event.room_name)
        if child is None and self._cluster is not None:
            self._offload(self._cluster.share_webhook(event))  # its owner may be elsewhere
            return
        if child is None:
            # Not ours (another app's room) or a session already reaped: say so, then drop.
            log.debug(
                "webhook for a room no live session owns",
                extra={"room_name": event.room_name, "kind": event.kind},
            )
            return
        child.actor.tell(RoomEventArrived(event))

    # outages and reconciliation ---------------------------------------------------------------

    def livekit_lost(self, reason: str, rooms_lost: bool) -> None:
        if not rooms_lost:
            return  # maybe a blip: the rooms are compared when LiveKit answers again
        for child in list(self._children.values()):
            child.actor.tell(Terminate(f"LiveKit room lost: {reason}"))

    def reconcile(self) -> None:
        """List LiveKit's rooms (outside the loop), then compare them with the live sessions."""
        compare = self._reconcile_rooms(time.monotonic())
        self._offload(self._deps.gateway.list_rooms(), then=compare)

    def _reconcile_rooms(self, asked_at: float) -> Callable[[asyncio.Future[dict[str, str]]], None]:
        """Compare LiveKit's rooms with the live sessions (after an outage, and every
        `room_sweep_interval`): a session whose room LiveKit no longer has is over; a room this
        deployment created that no live session owns (its delete failed, or a late joiner
        brought it back) is deleted. Sessions spawned after the listing was asked for are not
        judged by it; a room of a session still being created is among the children's already."""

        def compare(task: asyncio.Future[dict[str, str]]) -> None:
            if task.cancelled() or task.exception() is not None:
                log.warning("LiveKit rooms could not be listed")
                return
            rooms = task.result()
            for child in list(self._children.values()):
                record = child.actor.record
                if (
                    child.started < asked_at
                    and record.status is not SessionStatus.CREATING
                    and record.room_name not in rooms
                ):
                    child.actor.tell(Terminate("LiveKit room lost: LiveKit no longer has it"))
            deployment = self._deps.deployment
            for name, metadata in rooms.items():
                if not self._children.room_in_use(name) and created_by(metadata) == deployment:
                    self._offload(self._delete_stray_room(name, room_session(metadata)))

        return compare

    async def _delete_stray_room(self, name: str, session_id: str | None) -> None:
        if self._cluster is not None and session_id is not None:
            if await self._cluster.live_anywhere({session_id}):
                return  # the room of a session another process owns
        log.info("deleting a room no live session owns", extra={"room_name": name})
        try:
            await self._deps.gateway.delete_room(name)
        except ManagerError as exc:  # the next sweep tries again
            log.warning(
                "stray room could not be deleted", extra={"room_name": name, "error": exc.message}
            )
