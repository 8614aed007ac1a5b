"""Registered microservices: where to reach them, whether they are healthy, how loaded they are.

Changed only through Registry's own methods, and those are called only from the supervisor's
loop: it is the registry's one writer. The methods that change a registration are synchronous
(memory only); the supervisor then has `persist` write that service's current state as an owned
task, answers the caller once it is durable, and undoes the change if it cannot be written.
Health and load are live facts: after a restart every registration is `Unknown` until its
first health check (which runs at once), and load is rebuilt by new sessions.

Each registration has its own signing secret (`whsec_…`, Standard Webhooks): stored with it,
answered once at registration and at rotation, never part of a view, event or log. Calls to a
service are signed with its secret and with those of the other registrations at the same
endpoint (`signing_secrets`), so one process registered under several ids, or registered by
someone else too, verifies every call with the one secret it holds.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from session_manager.clock import rfc3339, utc_now
from session_manager.errors import InvalidRequest, NoCapacity, NotFound
from session_manager.events.signing import new_secret
from session_manager.store.base import JsonDict, Store

TYPE_PREFIX = "type:"
MAX_SIGNATURES = 16  # signatures on one call: its registration's, then others at its endpoint
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


@lru_cache(maxsize=4096)
def endpoint_key(endpoint: str) -> str:
    """Where an endpoint really is, for finding the registrations that share one: scheme, host
    (every loopback name and address counted as one), port, path."""
    try:
        parts = urlsplit(endpoint)
        host = (parts.hostname or "").rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return endpoint
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host in _LOOPBACK_NAMES or (address is not None and address.is_loopback):
        host = "loopback"
    elif address is not None:
        host = str(address)
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


class ServiceStatus(StrEnum):
    UNKNOWN = "Unknown"  # restored from the store, not checked yet: never chosen
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


@dataclass
class ServiceRecord:
    service_id: str
    endpoint: str
    metadata: dict[str, Any] = field(default_factory=dict)
    registered_at: datetime = field(default_factory=utc_now)
    updated_at: datetime = field(default_factory=utc_now)
    draining: bool = False
    status: ServiceStatus = ServiceStatus.HEALTHY
    failures_in_a_row: int = 0
    successes_in_a_row: int = 0
    last_error: str | None = None
    last_check_at: datetime | None = None
    sessions: set[str] = field(default_factory=set)  # sessions it is dispatched into
    # Several managers on one Redis: the sessions holding a place on it across all of them, as
    # last read (the sessions above are this process's only).
    cluster_sessions: int = 0
    last_chosen: float = 0.0  # monotonic; ties in free capacity go to the least recently used
    owner: str | None = None  # id of the API key that registered it (never the key)
    # Signs every call to the service; stored, never in a view (repr=False: nor in a repr).
    signing_secret: str = field(default_factory=new_secret, repr=False)

    @property
    def service_type(self) -> str | None:
        value = self.metadata.get("type")
        return value if isinstance(value, str) and value else None

    @property
    def max_sessions(self) -> int | None:
        value = self.metadata.get("max_sessions")
        if isinstance(value, bool):
            return None
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def health_interval(self) -> float | None:
        """Its own seconds between health checks (`metadata.health_interval`); None: the
        manager's. Bounded at registration (`api.limits`)."""
        return _number(self.metadata.get("health_interval"))

    @property
    def health_timeout(self) -> float | None:
        """Its own seconds one health check may take (`metadata.health_timeout`); None: the
        manager's."""
        return _number(self.metadata.get("health_timeout"))

    @property
    def unhealthy_after(self) -> int | None:
        """Its own failed checks in a row to be Unhealthy (`metadata.unhealthy_after`); None:
        the manager's."""
        value = self.metadata.get("unhealthy_after")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def free_capacity(self) -> float:
        limit = self.max_sessions
        return float("inf") if limit is None else float(limit - self.load)

    @property
    def load(self) -> int:
        """Sessions it serves: this process's, or the cluster's when that is known and more."""
        return max(len(self.sessions), self.cluster_sessions)

    @property
    def accepting(self) -> bool:
        """Healthy and not draining: may keep the sessions it has, capacity aside."""
        return self.status is ServiceStatus.HEALTHY and not self.draining

    @property
    def available(self) -> bool:
        """May be chosen for a new session: healthy, not draining, not full."""
        return self.accepting and self.free_capacity > 0

    def view(self) -> JsonDict:
        return {
            "service_id": self.service_id,
            "endpoint": self.endpoint,
            "metadata": self.metadata,
            "status": self.status.value,
            "draining": self.draining,
            "sessions": self.load,
            "max_sessions": self.max_sessions,
            "last_error": self.last_error,
            "last_check_at": rfc3339(self.last_check_at) if self.last_check_at else None,
            "registered_at": rfc3339(self.registered_at),
            "updated_at": rfc3339(self.updated_at),
        }

    def stored(self) -> JsonDict:
        return {
            "service_id": self.service_id,
            "endpoint": self.endpoint,
            "metadata": self.metadata,
            "draining": self.draining,
            "registered_at": rfc3339(self.registered_at),
            "updated_at": rfc3339(self.updated_at),
            "owner": self.owner,
            "signing_secret": self.signing_secret,
        }

    @classmethod
    def from_stored(cls, stored: JsonDict) -> ServiceRecord:
        registered = datetime.fromisoformat(stored["registered_at"])
        return cls(
            service_id=stored["service_id"],
            endpoint=stored["endpoint"],
            metadata=dict(stored.get("metadata") or {}),
            registered_at=registered,
            updated_at=datetime.fromisoformat(stored.get("updated_at") or stored["registered_at"]),
            draining=bool(stored.get("draining", False)),
            owner=stored.get("owner"),
            # Stored before secrets existed: one is made now (and `Registry.load` stores it).
            signing_secret=stored.get("signing_secret") or new_secret(),
            # Yesterday's endpoint may be dead today: nothing is sent to it until it answers.
            status=ServiceStatus.UNKNOWN,
        )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True)
class HealthChange:
    service_id: str
    old: ServiceStatus
    new: ServiceStatus
    error: str | None


class Registry:
    def __init__(self, store: Store, *, unhealthy_after: int = 3, healthy_after: int = 2) -> None:
        self._store = store
        self._services: dict[str, ServiceRecord] = {}
        self._unhealthy_after = unhealthy_after
        self._healthy_after = healthy_after
        # endpoint_key -> ids registered there; entries are added on every change of an
        # endpoint and dropped when found stale (see signing_secrets).
        self._by_endpoint: dict[str, set[str]] = {}

    async def load(self) -> None:
        stored = await self._store.load_services()
        self._services = {
            record.service_id: record for record in map(ServiceRecord.from_stored, stored)
        }
        for record in self._services.values():
            self._index(record)
        for entry in stored:  # stored before signing secrets: keep the one made at load
            if not entry.get("signing_secret"):
                await self._store.save_service(self._services[entry["service_id"]].stored())

    def _index(self, record: ServiceRecord) -> None:
        self._by_endpoint.setdefault(endpoint_key(record.endpoint), set()).add(record.service_id)

    # registrations (memory; the supervisor persists them) ------------------------------------

    def register(
        self, service_id: str, endpoint: str, metadata: dict[str, Any], owner: str | None = None
    ) -> ServiceRecord:
        if service_id in self._services:
            raise InvalidRequest("Service ID already exists")
        record = ServiceRecord(service_id, endpoint, metadata, owner=owner)
        self._services[service_id] = record
        self._index(record)
        return record

    def update(
        self,
        service_id: str,
        *,
        endpoint: str | None = None,
        metadata: dict[str, Any] | None = None,
        draining: bool | None = None,
    ) -> tuple[ServiceRecord, Callable[[], None]]:
        """Change a registration; returns it and the way to undo the change."""
        record = self.get(service_id)
        old = (record.endpoint, record.metadata, record.draining, record.updated_at)

        def undo() -> None:
            record.endpoint, record.metadata, record.draining, record.updated_at = old
            self._index(record)

        if endpoint is not None:
            record.endpoint = endpoint
            self._index(record)
        if metadata is not None:
            record.metadata = metadata
        if draining is not None:
            record.draining = draining
        record.updated_at = utc_now()
        return record, undo

    def deregister(self, service_id: str) -> tuple[ServiceRecord, Callable[[], None]]:
        record = self.get(service_id)
        del self._services[service_id]

        def undo() -> None:
            self._services.setdefault(service_id, record)
            self._index(record)

        return record, undo

    def rotate_secret(self, service_id: str) -> tuple[ServiceRecord, Callable[[], None]]:
        """Give a registration a new signing secret, in force at once (calls from now on are
        signed with it); returns it and the way to undo the change."""
        record = self.get(service_id)
        old = record.signing_secret

        def undo() -> None:
            record.signing_secret = old

        record.signing_secret = new_secret()
        return record, undo

    def apply_stored(
        self, service_id: str, stored: JsonDict | None, status: ServiceStatus | None
    ) -> None:
        """Another process of the cluster changed this registration in the shared store: take
        its registration as stored, keeping what this process knows live (health, its load).
        A registration new here starts with `status` (its health where it was registered)."""
        if stored is None:
            self._services.pop(service_id, None)
            return
        fresh = ServiceRecord.from_stored(stored)
        known = self._services.get(service_id)
        if known is None:
            fresh.status = status or ServiceStatus.UNKNOWN
        else:
            fresh.status, fresh.sessions = known.status, known.sessions
            fresh.failures_in_a_row = known.failures_in_a_row
            fresh.successes_in_a_row = known.successes_in_a_row
            fresh.last_error, fresh.last_check_at = known.last_error, known.last_check_at
            fresh.last_chosen = known.last_chosen
        self._services[service_id] = fresh
        self._index(fresh)

    def apply_cluster_load(self, loads: dict[str, int]) -> None:
        """How many sessions hold a place on each instance across the cluster, as just read."""
        for service_id, count in loads.items():
            record = self._services.get(service_id)
            if record is not None:
                record.cluster_sessions = count

    def forget(self, service_id: str) -> None:
        """Undo a `register` whose write failed."""
        self._services.pop(service_id, None)

    async def persist(self, service_id: str) -> None:
        """Write what the registry holds now for `service_id`: the record, or its absence.
        Writing the current state (not the change) keeps later writes right whatever order
        earlier ones finished in."""
        record = self._services.get(service_id)
        if record is None:
            await self._store.delete_service(service_id)
        else:
            await self._store.save_service(record.stored())

    # reads -----------------------------------------------------------------------------------

    def get(self, service_id: str) -> ServiceRecord:
        try:
            return self._services[service_id]
        except KeyError:
            raise NotFound(f"Microservice {service_id} is not registered") from None

    def find(self, service_id: str) -> ServiceRecord | None:
        return self._services.get(service_id)

    def signing_secrets(self, service_id: str, endpoint: str) -> list[str]:
        """The secrets a call for `service_id` to `endpoint` is signed with: its own first, then
        those of the other registrations at the same endpoint (oldest first), at most
        MAX_SIGNATURES. Another registration's signature only lets that service accept a call
        the manager really makes to it; nobody learns a secret that is not theirs.
        (Only drops stale entries of its look-up index: registrations are not changed.)"""
        own = self._services.get(service_id)
        key = endpoint_key(endpoint)
        ids = self._by_endpoint.get(key, set())
        others = []
        for other_id in list(ids):
            record = self._services.get(other_id)
            if record is None or endpoint_key(record.endpoint) != key:
                ids.discard(other_id)  # deregistered or moved since
            elif record is not own:
                others.append(record)
        if not ids:
            self._by_endpoint.pop(key, None)
        others.sort(key=lambda record: (record.registered_at, record.service_id))
        secrets = [own.signing_secret] if own is not None else []
        secrets.extend(record.signing_secret for record in others)
        return secrets[:MAX_SIGNATURES]

    def all(self) -> list[ServiceRecord]:
        return list(self._services.values())

    def listing(self, *, service_type: str | None, status: str | None) -> list[ServiceRecord]:
        records = sorted(self._services.values(), key=lambda r: r.service_id)
        if service_type is not None:
            records = [r for r in records if r.service_type == service_type]
        if status is not None:
            wanted = status.lower()
            records = [
                r
                for r in records
                if r.status.value.lower() == wanted or (wanted == "draining" and r.draining)
            ]
        return records

    # health (live) ---------------------------------------------------------------------------

    def record_health(self, service_id: str, error: str | None) -> HealthChange | None:
        """Apply one health check result; returns the change of status it caused, if any."""
        record = self._services.get(service_id)
        if record is None:  # deregistered while the check ran
            return None
        record.last_check_at = utc_now()
        old = record.status
        first = old is ServiceStatus.UNKNOWN  # the first check decides at once
        if error is None:
            record.successes_in_a_row += 1
            record.failures_in_a_row = 0
            if first or (
                old is ServiceStatus.UNHEALTHY and record.successes_in_a_row >= self._healthy_after
            ):
                record.status = ServiceStatus.HEALTHY
                record.last_error = None
        else:
            record.failures_in_a_row += 1
            record.successes_in_a_row = 0
            record.last_error = error
            unhealthy_after = record.unhealthy_after or self._unhealthy_after
            if first or (
                old is ServiceStatus.HEALTHY and record.failures_in_a_row >= unhealthy_after
            ):
                record.status = ServiceStatus.UNHEALTHY
        if record.status is old:
            return None
        return HealthChange(service_id, old, record.status, record.last_error)

    def record_lost(self, service_id: str, error: str) -> HealthChange | None:
        """The instance's process is known dead (its presence connection was lost without a
        goodbye): Unhealthy at once, whatever the checks said; the checks make it Healthy
        again if it answers (`healthy_after` good ones)."""
        record = self._services.get(service_id)
        if record is None:
            return None
        old = record.status
        record.status, record.last_error = ServiceStatus.UNHEALTHY, error
        record.successes_in_a_row = 0
        if old is ServiceStatus.UNHEALTHY:
            return None
        return HealthChange(service_id, old, record.status, error)

    # choice and load (live) ------------------------------------------------------------------

    def choose(self, requirement: str, *, exclude: Iterable[str] = ()) -> ServiceRecord:
        """The instance to dispatch for `requirement`: a service id, or `type:X` for the
        available instance of type X with the most free capacity (ties: least recently used)."""
        excluded = set(exclude)
        if not requirement.startswith(TYPE_PREFIX):
            record = self._services.get(requirement)
            if record is None:
                raise InvalidRequest(f"Required services not registered: {requirement}")
            if record.draining:
                raise NoCapacity(f"Microservice {requirement} is draining")
            if record.free_capacity <= 0:
                raise NoCapacity(f"Microservice {requirement} is at max_sessions")
            return record
        wanted = requirement[len(TYPE_PREFIX) :]
        candidates = [
            r
            for r in self._services.values()
            if r.service_type == wanted and r.available and r.service_id not in excluded
        ]
        if not candidates:
            raise NoCapacity(f"No available microservice of type {wanted}")
        return min(candidates, key=lambda r: (-r.free_capacity, r.last_chosen))

    def alternative(self, service_id: str, *, exclude: Iterable[str]) -> ServiceRecord | None:
        """Another available instance of the same type as `service_id`, if there is one."""
        record = self._services.get(service_id)
        service_type = record.service_type if record is not None else None
        if service_type is None:
            return None
        try:
            return self.choose(TYPE_PREFIX + service_type, exclude={service_id, *exclude})
        except NoCapacity:
            return None

    def defaults(self) -> list[ServiceRecord]:
        """What a session gets when it names no services: every available one."""
        return [record for record in self._services.values() if record.available]

    def acquire(self, service_id: str, session_id: str) -> None:
        record = self._services.get(service_id)
        if record is not None:
            record.sessions.add(session_id)
            record.last_chosen = time.monotonic()

    def release(self, service_id: str, session_id: str) -> None:
        record = self._services.get(service_id)
        if record is not None:
            record.sessions.discard(session_id)

    def release_session(self, session_id: str) -> None:
        for record in self._services.values():
            record.sessions.discard(session_id)
