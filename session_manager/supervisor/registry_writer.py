"""The supervisor as the registry's one writer: registrations, health results and load change
only from its loop, one command at a time.

A registration made with another API key is Forbidden; past `max_services` a registration is
TooManyRequests. A change is made in memory, written through the store, and answered once
durable (or undone). An instance that turns Unhealthy, or whose process is known dead, is
taken from its sessions at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from session_manager.clock import utc_now
from session_manager.cluster.node import ClusterNode
from session_manager.commands import (
    Access,
    DeregisterService,
    DrainService,
    GetService,
    ListServices,
    ProcessLost,
    RegisterService,
    RotateServiceSecret,
    SupervisorMessage,
    UpdateService,
)
from session_manager.errors import Forbidden, TooManyRequests
from session_manager.events import EventLog, EventType
from session_manager.registry import Registry, ServiceRecord
from session_manager.registry.health import HealthResults
from session_manager.registry.registry import HealthChange, ServiceStatus
from session_manager.session.messages import FailoverCause, InstanceLost, settle
from session_manager.session.record import JsonDict
from session_manager.store.base import Store
from session_manager.supervisor.children import Children
from session_manager.supervisor.offload import Offload, as_store_error
from session_manager.supervisor.spawning import LIMIT_RETRY_AFTER

log = logging.getLogger("session_manager.supervisor")  # the supervisor's one logger

PROCESS_LOST = "process lost"  # a lost instance's last_error, and its health event's error


class RegistryWriter:
    """Owns the writes to the registry (and the registration write in flight per service id);
    runs on the supervisor's loop only."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        events: EventLog,
        children: Children,
        offload: Offload,
        cluster: ClusterNode | None,
        *,
        max_services: int,
        startup_timeout: float,
    ) -> None:
        self._registry = registry
        self._store = store
        self._events = events
        self._children = children
        self._offload = offload
        self._cluster = cluster
        self._max_services = max_services
        self._startup_timeout = startup_timeout
        self._registry_writes: dict[str, asyncio.Task[None]] = {}  # last write per service id

    def handle(self, message: SupervisorMessage) -> None:
        """A registration command from the front door."""
        registry = self._registry
        match message:
            case RegisterService(service_id=sid, endpoint=endpoint, metadata=meta, reply=reply):
                if registry.find(sid) is None and len(registry.all()) >= self._max_services:
                    raise TooManyRequests(
                        f"the registry holds its most microservices ({self._max_services})",
                        retry_after=LIMIT_RETRY_AFTER,
                    )
                record = registry.register(sid, endpoint, meta, owner=message.access.owner)
                self._persist_registration(
                    record,
                    reply,
                    lambda: registry.forget(sid),
                    EventType.MICROSERVICE_REGISTERED,
                    answer=_secret_answer(record),
                )
            case UpdateService(service_id=sid, endpoint=endpoint, metadata=meta, reply=reply):
                _check_service_owner(registry.get(sid), message.access)
                record, undo = registry.update(
                    sid, endpoint=endpoint, metadata=meta, draining=message.draining
                )
                self._persist_registration(record, reply, undo, EventType.MICROSERVICE_UPDATED)
            case DrainService(service_id=sid, reply=reply):
                _check_service_owner(registry.get(sid), message.access)
                record, undo = registry.update(sid, draining=True)
                self._persist_registration(record, reply, undo, EventType.MICROSERVICE_UPDATED)
            case DeregisterService(service_id=sid, reply=reply):
                _check_service_owner(registry.get(sid), message.access)
                record, undo = registry.deregister(sid)
                self._persist_registration(record, reply, undo, EventType.MICROSERVICE_DEREGISTERED)
            case RotateServiceSecret(service_id=sid, reply=reply):
                _check_service_owner(registry.get(sid), message.access)
                record, undo = registry.rotate_secret(sid)  # signs with the new one at once
                secret = _secret_answer(record)
                self._persist_registration(
                    record, reply, undo, EventType.MICROSERVICE_UPDATED, answer=secret
                )
            case GetService(service_id=sid, reply=reply):
                _check_service_owner(registry.get(sid), message.access)
                settle(reply, registry.get(sid).view())
            case ListServices(service_type=service_type, status=status, reply=reply):
                records = registry.listing(service_type=service_type, status=status)
                settle(reply, [record.view() for record in records])

    def _persist_registration(
        self,
        record: ServiceRecord,
        reply: asyncio.Future[JsonDict],
        undo: Callable[[], None],
        event: EventType,
        *,
        answer: JsonDict | None = None,
    ) -> None:
        """Write the change made in memory; answer once durable (with the view, or `answer`),
        or undo it and say why. Writes for one service id run one after another, so the last
        change is the one kept."""
        service_id = record.service_id
        previous = self._registry_writes.get(service_id)

        async def write() -> None:
            if previous is not None:
                await asyncio.wait([previous], timeout=self._startup_timeout)
            await self._registry.persist(service_id)

        def written(task: asyncio.Future[None]) -> None:
            if self._registry_writes.get(service_id) is task:
                del self._registry_writes[service_id]
            if task.cancelled():
                return
            error = task.exception()
            if error is not None:
                undo()
                settle(reply, error=as_store_error(error))
                return
            log.info(event.value, extra={"service_id": service_id})
            self._events.append(event, service_id=service_id, data=record.view())
            if self._cluster is not None:  # the other processes read it again
                status = record.status.value if self._registry.find(service_id) else None
                self._offload(self._cluster.bus.announce_registration(service_id, status))
            settle(reply, record.view() if answer is None else answer)

        self._registry_writes[service_id] = self._offload(write(), then=written)

    def registry_changed(self, service_id: str, status: str | None) -> None:
        """Another process of the cluster changed a registration: read it again."""
        self._offload(
            self._store.load_services(),
            then=lambda task: self._registration_read(service_id, status, task),
        )

    def _registration_read(
        self, service_id: str, status: str | None, task: asyncio.Future[list[JsonDict]]
    ) -> None:
        if task.cancelled() or task.exception() is not None:
            log.warning(
                "a registration changed elsewhere could not be read",
                extra={"service_id": service_id},
            )
            return
        stored = next((s for s in task.result() if s["service_id"] == service_id), None)
        self._registry.apply_stored(service_id, stored, ServiceStatus(status) if status else None)

    def health_checked(self, results: HealthResults) -> None:
        for service_id, error in results:
            change = self._registry.record_health(service_id, error)
            if change is not None:
                lost = InstanceLost(service_id, f"unhealthy: {error}", detected_at=utc_now())
                self._health_changed(change, lost)

    def process_lost(self, message: ProcessLost) -> None:
        """An SDK instance's process is dead: Unhealthy with error "process lost" at once,
        and its sessions move now (told when it went and when that was known)."""
        sid = message.service_id
        change = self._registry.record_lost(sid, PROCESS_LOST)
        if change is None:
            return  # gone from the registry, or already Unhealthy (its sessions were told)
        lost = InstanceLost(
            sid,
            PROCESS_LOST,
            cause=FailoverCause.PROCESS_LOST,
            gone_at=message.gone_at,
            detected_at=message.detected_at,
        )
        detect_ms = round((message.detected_at - message.gone_at).total_seconds() * 1000, 1)
        self._health_changed(change, lost, detect_ms=detect_ms)

    def _health_changed(
        self, change: HealthChange, lost: InstanceLost, *, detect_ms: float | None = None
    ) -> None:
        service_id = change.service_id
        level = logging.WARNING if change.new is ServiceStatus.UNHEALTHY else logging.INFO
        log.log(
            level,
            "microservice health changed",
            extra={
                "service_id": service_id,
                "old": change.old.value,
                "new": change.new.value,
                "error": change.error,
            },
        )
        data: JsonDict = {"old": change.old.value, "new": change.new.value, "error": change.error}
        if detect_ms is not None:
            data["detect_ms"] = detect_ms  # from the connection's loss to the verdict
        self._events.append(EventType.MICROSERVICE_HEALTH_CHANGED, service_id=service_id, data=data)
        if change.new is not ServiceStatus.UNHEALTHY:
            return
        # Sessions lose an instance that turned Unhealthy at once, instead of waiting the
        # ~20 s LiveKit takes to notice it is gone.
        record = self._registry.find(service_id)
        for session_id in sorted(record.sessions) if record else ():
            child = self._children.get(session_id)
            if child is not None:
                child.actor.tell(lost)


def _secret_answer(record: ServiceRecord) -> JsonDict:
    """The answer of a registration or a rotation: its secret as it is now (the one time it is
    handed out), apart from the view, which never holds it."""
    return {"service_id": record.service_id, "signing_secret": record.signing_secret}


def _check_service_owner(record: ServiceRecord, access: Access) -> None:
    """A registration made with another API key may be read and changed only by an admin."""
    if not access.may_use(record.owner):
        raise Forbidden(f"Microservice {record.service_id} was registered with another API key")
