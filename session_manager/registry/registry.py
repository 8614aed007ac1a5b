"""Registered microservices. Changed only through Registry's own methods, which persist each
change before they return, so an acknowledged registration survives a restart."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from session_manager.clock import rfc3339, utc_now
from session_manager.errors import InvalidRequest, NotFound
from session_manager.store.base import JsonDict, Store

HEALTHY = "Healthy"


@dataclass
class ServiceRecord:
    service_id: str
    endpoint: str
    metadata: dict[str, Any] = field(default_factory=dict)
    registered_at: datetime = field(default_factory=utc_now)
    status: str = HEALTHY

    @property
    def service_type(self) -> str | None:
        value = self.metadata.get("type")
        return value if isinstance(value, str) else None

    def view(self) -> JsonDict:
        return {
            "service_id": self.service_id,
            "endpoint": self.endpoint,
            "metadata": self.metadata,
            "status": self.status,
            "registered_at": rfc3339(self.registered_at),
        }

    @classmethod
    def from_view(cls, view: JsonDict) -> ServiceRecord:
        return cls(
            service_id=view["service_id"],
            endpoint=view["endpoint"],
            metadata=dict(view.get("metadata") or {}),
            registered_at=datetime.fromisoformat(view["registered_at"]),
            status=view.get("status", HEALTHY),
        )


class Registry:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._services: dict[str, ServiceRecord] = {}

    async def load(self) -> None:
        self._services = {
            record.service_id: record
            for record in map(ServiceRecord.from_view, await self._store.load_services())
        }

    async def register(
        self, service_id: str, endpoint: str, metadata: dict[str, Any]
    ) -> ServiceRecord:
        if service_id in self._services:
            raise InvalidRequest("Service ID already exists")
        record = ServiceRecord(service_id, endpoint, metadata)
        # Claim the id before the write so a concurrent duplicate is refused, and give it back
        # if the write fails, so nothing half-registered stays behind.
        self._services[service_id] = record
        try:
            await self._store.save_service(record.view())
        except BaseException:
            self._services.pop(service_id, None)
            raise
        return record

    def get(self, service_id: str) -> ServiceRecord:
        try:
            return self._services[service_id]
        except KeyError:
            raise NotFound(f"Microservice {service_id} is not registered") from None

    def all(self) -> list[ServiceRecord]:
        return list(self._services.values())

    def resolve(self, required: list[str] | None) -> list[ServiceRecord]:
        """The services a new session needs: the named ones, or every healthy one when None."""
        if required is None:
            return [record for record in self._services.values() if record.status == HEALTHY]
        unknown = [service_id for service_id in required if service_id not in self._services]
        if unknown:
            raise InvalidRequest(f"Required services not registered: {', '.join(unknown)}")
        return [self._services[service_id] for service_id in dict.fromkeys(required)]
