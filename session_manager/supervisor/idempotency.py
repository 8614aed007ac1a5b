"""Creates under an Idempotency-Key: the key is looked up in the store (outside the loop); a
stored answer younger than `idempotency_ttl` is replayed with a fresh client token, anything
else creates the session, and the answer is stored before it is given. Retries with the key
that come meanwhile wait with the first; the same key with another body is a Conflict.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from session_manager.commands import CreateSession, IoFinished, NewSession, SupervisorMessage
from session_manager.errors import Conflict, ManagerError, ShuttingDown
from session_manager.session.deps import SessionDeps, mint_client_token
from session_manager.session.messages import SessionCreated, Terminate, settle
from session_manager.session.record import JsonDict, SessionRecord
from session_manager.store.base import Store
from session_manager.supervisor.children import Children
from session_manager.supervisor.offload import Offload, as_store_error


@dataclass
class PendingCreate:
    """A create under an Idempotency-Key not yet stored; retries with the key wait for it."""

    body_hash: str
    spec: NewSession
    waiters: list[asyncio.Future[SessionCreated]]


class IdempotentCreates:
    """Owns the creates under an Idempotency-Key not yet stored (`pending`, by key); runs on the
    supervisor's loop: each step's I/O is offloaded and its next step comes back there."""

    def __init__(
        self,
        store: Store,
        deps: SessionDeps,
        children: Children,
        offload: Offload,
        tell: Callable[[SupervisorMessage], None],
        *,
        create: Callable[[NewSession, asyncio.Future[SessionCreated]], None],
        ttl: float,
    ) -> None:
        self._store = store
        self._deps = deps
        self._children = children
        self._offload = offload
        self._tell = tell
        self._create = create  # admit and spawn (a warm pool's member first)
        self._ttl = ttl
        self.pending: dict[str, PendingCreate] = {}

    def create(self, key: str, message: CreateSession) -> None:
        """A create the supervisor has admitted, under Idempotency-Key `key`."""
        pending = self.pending.get(key)
        if pending is not None:
            _check_same_body(key, pending.body_hash, message.body_hash)
            pending.waiters.append(message.reply)
            return
        pending = PendingCreate(message.body_hash, message.spec, [message.reply])
        self.pending[key] = pending
        self._offload(self._store.get_idempotency(key), then=self._looked_up(key))

    def refuse_all(self) -> None:
        """Answer every waiter: the supervisor is stopping."""
        for pending in self.pending.values():
            for waiter in pending.waiters:
                settle(waiter, error=ShuttingDown("the session manager is shutting down"))
        self.pending.clear()

    def _looked_up(self, key: str) -> Callable[[asyncio.Future[JsonDict | None]], None]:
        def decide(task: asyncio.Future[JsonDict | None]) -> None:
            pending = self.pending[key]
            error = None if task.cancelled() else task.exception()
            stored = None if task.cancelled() or error else task.result()
            if task.cancelled() or error is not None:
                del self.pending[key]
                for waiter in pending.waiters:
                    settle(waiter, error=as_store_error(error))
            elif stored is not None and time.time() - stored["created_at"] < self._ttl:
                del self.pending[key]
                created = self._replayed(stored["response"], pending.spec)
                for waiter in pending.waiters:
                    if stored["body_hash"] == pending.body_hash:
                        settle(waiter, created)
                    else:
                        settle(waiter, error=_different_body(key))
            else:
                self._spawn(key, pending)

        return decide

    def _spawn(self, key: str, pending: PendingCreate) -> None:
        outcome: asyncio.Future[SessionCreated] = asyncio.get_running_loop().create_future()
        try:
            self._create(pending.spec, outcome)
        except ManagerError as exc:
            del self.pending[key]
            for waiter in pending.waiters:
                settle(waiter, error=exc)
            return
        finish = self._finished(key)
        outcome.add_done_callback(lambda done: self._tell(IoFinished(done, finish)))

    def _finished(self, key: str) -> Callable[[asyncio.Future[SessionCreated]], None]:
        def finish(outcome: asyncio.Future[SessionCreated]) -> None:
            pending = self.pending[key]
            if outcome.exception() is not None:
                del self.pending[key]  # a failed create may be tried again
                for waiter in pending.waiters:
                    _answer_from(outcome, waiter)
                return
            # Durable before it is answered: a crash after the answer cannot make a retry with
            # the key create a second session. Retries that come meanwhile wait with the first.
            # What is stored keeps no token: a replay mints a fresh one.
            response = {k: v for k, v in outcome.result().__dict__.items() if k != "access_token"}
            entry = {
                "body_hash": pending.body_hash,
                "created_at": time.time(),
                "response": response,
            }
            self._offload(
                self._store.save_idempotency(key, entry),
                then=self._saved(key, outcome),
            )

        return finish

    def _saved(
        self, key: str, outcome: asyncio.Future[SessionCreated]
    ) -> Callable[[asyncio.Future[None]], None]:
        def answer(saved: asyncio.Future[None]) -> None:
            pending = self.pending.pop(key)
            error = saved.exception()
            if error is None:
                for waiter in pending.waiters:
                    _answer_from(outcome, waiter)
                return
            # Unanswered, the session has no user yet; kept, a retry would make a second one.
            session_id = outcome.result().session_id
            child = self._children.get(session_id)
            if child is not None:
                child.actor.tell(Terminate("its Idempotency-Key could not be stored"))
            for waiter in pending.waiters:
                settle(waiter, error=as_store_error(error))

        return answer

    def _replayed(self, response: JsonDict, spec: NewSession) -> SessionCreated:
        """The stored answer to a create, with a fresh client token (none is stored)."""
        record = SessionRecord(
            session_id=response["session_id"],
            room_name=response["room_name"],
            user_identity=spec.user_identity,
            user_name=spec.user_name,
            metadata=spec.metadata,
        )
        token = mint_client_token(self._deps, record)
        return SessionCreated(**{**response, "access_token": token})


def _check_same_body(key: str, known: str, given: str) -> None:
    if known != given:
        raise _different_body(key)


def _different_body(key: str) -> Conflict:
    return Conflict(f"Idempotency-Key {key} was used with a different request body")


def _answer_from(
    outcome: asyncio.Future[SessionCreated], waiter: asyncio.Future[SessionCreated]
) -> None:
    error = outcome.exception()
    settle(waiter, None if error else outcome.result(), error)
