"""The supervisor's children: the session actors this process runs, each in a task, found by
session id and by room name, with each one's latest view and each user's count of live
sessions.

Sessions are OTP `temporary` children: never restarted; when one ends (or crashes) it is
cleaned up (forgotten here, its services' capacity given back by the supervisor's reap), and its
final view stays readable from the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, ValuesView
from dataclasses import dataclass, field

from session_manager.session.actor import SessionActor
from session_manager.session.deps import SessionDeps
from session_manager.session.messages import SessionMessage
from session_manager.session.pool_member import PoolMemberActor
from session_manager.session.record import JsonDict, SessionRecord
from session_manager.store.base import Store


@dataclass
class Child:
    actor: SessionActor
    task: asyncio.Task[None]
    started: float = field(default_factory=time.monotonic)


class Children:
    """Owns the table of running session actors (by id, by room, their views, live sessions
    per user); changed only from the supervisor's loop, and a view only by its actor's
    `publish`."""

    def __init__(
        self,
        deps: SessionDeps,
        store: Store,
        on_exit: Callable[[str, asyncio.Task[None]], None],
    ) -> None:
        self._deps = deps
        self._store = store
        self._on_exit = on_exit  # told in the task's done callback: back through the inbox
        self._children: dict[str, Child] = {}
        self._rooms: dict[str, str] = {}  # room name -> session id, for routing webhooks
        self._views: dict[str, JsonDict] = {}  # latest view of each live session
        self._live_per_user: dict[str, int] = {}  # user_identity -> its live sessions
        self.created = 0  # counters for /metrics
        self.ended = 0

    def get(self, session_id: str) -> Child | None:
        return self._children.get(session_id)

    def __getitem__(self, session_id: str) -> Child:
        return self._children[session_id]

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._children

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self) -> Iterator[str]:
        return iter(self._children)

    def values(self) -> ValuesView[Child]:
        return self._children.values()

    def by_room(self, room_name: str) -> Child | None:
        session_id = self._rooms.get(room_name)
        return self._children.get(session_id) if session_id else None

    def room_in_use(self, room_name: str) -> bool:
        return room_name in self._rooms

    def view(self, session_id: str) -> JsonDict | None:
        return self._views.get(session_id)

    def live_statuses(self) -> dict[str, int]:
        """How many live sessions are in each status (from their published views)."""
        counts: dict[str, int] = {}
        for view in self._views.values():
            counts[view["status"]] = counts.get(view["status"], 0) + 1
        return counts

    def live_count(self, user: str) -> int:
        return self._live_per_user.get(user, 0)

    def count_user(self, user: str, change: int) -> None:
        left = self._live_per_user.get(user, 0) + change
        if left > 0:
            self._live_per_user[user] = left
        else:
            self._live_per_user.pop(user, None)

    def run(
        self, session: SessionRecord, first: SessionMessage, actor: SessionActor | None = None
    ) -> None:
        """Start an actor for `session` (a plain session actor unless one is given) and tell it
        `first`."""
        session_id = session.session_id
        actor = actor or SessionActor(session, self._deps, self.publish)
        task = asyncio.create_task(actor.run(), name=f"session-{session_id}")
        task.add_done_callback(lambda done: self._on_exit(session_id, done))
        self._children[session_id] = Child(actor, task)
        self._rooms[session.room_name] = session_id
        user = session.user_identity
        self._live_per_user[user] = self._live_per_user.get(user, 0) + 1
        actor.tell(first)

    def publish(self, view: JsonDict) -> None:
        """Called by session actors after each change: the only writer of a session's view."""
        self._views[view["session_id"]] = view
        self._store.save_session(view)

    def forget(self, session_id: str) -> Child | None:
        """The child that ended, gone from every table here (None if it was not known)."""
        child = self._children.pop(session_id, None)
        if child is not None:
            self._rooms.pop(child.actor.record.room_name, None)
            self.ended += 0 if unclaimed(child.actor) else 1
            user = child.actor.record.user_identity
            left = self._live_per_user.pop(user, 1) - 1
            if left > 0:
                self._live_per_user[user] = left
        self._views.pop(session_id, None)
        return child


def unclaimed(actor: SessionActor) -> bool:
    """A warm pool's member no user has taken yet."""
    return isinstance(actor, PoolMemberActor) and actor.waiting_for_user
