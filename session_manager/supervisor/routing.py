"""Commands for one session, routed to where it is: its actor when it runs in this process;
otherwise the store answers (it has ended, or never existed), or, with several processes, the
process of the cluster that owns it runs the command. The other way round, the cluster bus
asks this process to run commands other processes received for sessions it owns.

Ownership is checked in the supervisor's loop too: each command from the front door carries the
caller's `Access` (its API key's id, and whether it is admin), and a session created with
another key is NotFound, as if it did not exist.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from session_manager.cluster.bus import SessionCommand
from session_manager.cluster.node import ClusterNode
from session_manager.commands import (
    OPEN_ACCESS,
    Access,
    AddSessionService,
    DeleteSession,
    GetSession,
    ListSessions,
    RemoveSessionService,
    SupervisorMessage,
)
from session_manager.errors import Conflict, ManagerError, NotFound
from session_manager.session.messages import AddService, RemoveService, Terminate, settle
from session_manager.session.record import JsonDict
from session_manager.session.states import LIVE_STATUSES
from session_manager.store.base import Store
from session_manager.supervisor.children import Children
from session_manager.supervisor.offload import Offload

log = logging.getLogger("session_manager.supervisor")  # the supervisor's one logger

TERMINATED_BY_REQUEST = "terminated by request"


class SessionRouting:
    """Routes the commands for one session (here, the store, or the owning process); runs on
    the supervisor's loop, apart from `run_for_another_process` (the cluster bus's loop), which
    only reads and then goes through the inbox."""

    def __init__(
        self,
        children: Children,
        store: Store,
        offload: Offload,
        tell: Callable[[SupervisorMessage], None],
        cluster: ClusterNode | None,
    ) -> None:
        self._children = children
        self._store = store
        self._offload = offload
        self._tell = tell
        self._cluster = cluster

    # from the front door ----------------------------------------------------------------------

    def get_session(self, message: GetSession) -> None:
        session_id, reply, access = message.session_id, message.reply, message.access
        view = self._children.view(session_id)
        if view is not None:
            check_session_owner(session_id, view.get("owner"), access)
            settle(reply, view)
        else:
            self._offload(self._stored_view(session_id, access), reply=reply)

    def list_sessions(self, message: ListSessions) -> None:
        self._offload(
            self._store.list_sessions(
                status=message.status,
                user_identity=message.user_identity,
                limit=message.limit,
                before=message.before,
                owner=message.access.owner_filter,
            ),
            reply=message.reply,
        )

    def delete_session(self, message: DeleteSession) -> None:
        session_id, reply, access = message.session_id, message.reply, message.access
        child = self._children.get(session_id)
        if child is not None:
            check_session_owner(session_id, child.actor.record.owner, access)
            child.actor.tell(Terminate(TERMINATED_BY_REQUEST, reply))
        else:  # already ended (idempotent), or another process's
            self._offload(self._elsewhere(session_id, "delete", None, access), reply=reply)

    def add_service(self, message: AddSessionService) -> None:
        self._tell_running(
            message.session_id,
            AddService(message.requirement, message.reply),
            message.reply,
            message.access,
        )

    def remove_service(self, message: RemoveSessionService) -> None:
        self._tell_running(
            message.session_id,
            RemoveService(message.service_id, message.reply),
            message.reply,
            message.access,
        )

    def _tell_running(
        self,
        session_id: str,
        message: Any,
        reply: asyncio.Future[Any],
        access: Access = OPEN_ACCESS,
    ) -> None:
        child = self._children.get(session_id)
        if child is not None:
            check_session_owner(session_id, child.actor.record.owner, access)
            child.actor.tell(message)
            return

        op = "add_service" if isinstance(message, AddService) else "remove_service"
        argument = message.requirement if isinstance(message, AddService) else message.service_id
        self._offload(self._elsewhere(session_id, op, argument, access), reply=reply)

    async def _stored_view(self, session_id: str, access: Access = OPEN_ACCESS) -> JsonDict:
        view = await self._store.get_session(session_id)
        if view is None:
            raise NotFound(f"Session {session_id} not found")
        check_session_owner(session_id, view.get("owner"), access)
        return view

    async def _elsewhere(
        self, session_id: str, op: str, argument: str | None, access: Access
    ) -> JsonDict:
        """A command for a session with no actor here: it has ended (a delete answers its final
        view, anything else a 409), never existed (404), or runs in another process of the
        cluster, which is asked to run it."""
        view = await self._stored_view(session_id, access)  # NotFound when it never existed
        if self._cluster is not None and view["status"] in {s.value for s in LIVE_STATUSES}:
            return await self._cluster.ask_owner(SessionCommand(op, session_id, argument, access))
        if op == "delete":
            return view
        raise Conflict(f"Session {session_id} has ended")

    # from the other processes of the cluster --------------------------------------------------

    def sessions_lost(self, session_ids: list[str]) -> None:
        """Their leases went to another process: their actors here stop acting for them."""
        for session_id in session_ids:
            child = self._children.get(session_id)
            if child is not None:
                child.actor.relinquish()

    def run_for_another_process(self, command: SessionCommand) -> asyncio.Future[JsonDict] | None:
        """The cluster bus asks whether this process owns a session, and if so to run a command
        another process received for it (called from the bus's loop: only reads here)."""
        if command.session_id not in self._children:
            return None
        reply: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        sid, argument, access = command.session_id, command.argument or "", command.access
        if command.op == "delete":
            self._tell(DeleteSession(sid, reply, access))
        elif command.op == "add_service":
            self._tell(AddSessionService(sid, argument, reply, access))
        else:
            self._tell(RemoveSessionService(sid, argument, reply, access))
        return self._offload(self._written_then(reply))

    async def _written_then(self, reply: asyncio.Future[JsonDict]) -> JsonDict:
        """The answer to another process, once the change is written: the asker reads from the
        store what it was answered."""
        view = await reply
        try:
            await self._store.flush()
        except ManagerError:
            log.warning("a change answered to another process is not written yet")
        return view


def check_session_owner(session_id: str, owner: str | None, access: Access) -> None:
    """A session created with another API key does not exist for this caller: 404."""
    if not access.may_use(owner):
        raise NotFound(f"Session {session_id} not found")
