"""The one event shape every consumer sees: SSE streams, JSON polling and outbound webhooks.

`{id, type, timestamp, session_id, service_id, data}`; ids increase; the JSON is produced once,
when the event is made, and shared by every consumer. No credential ever leaves in an event:
any key of `data` (at any depth) whose name says token, secret, password or authorization is
removed, and the removal is logged as the bug it is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]

SENSITIVE_KEY_MARKERS = ("token", "secret", "password", "authorization")


class EventType(StrEnum):
    SESSION_CREATED = "SessionCreated"
    SESSION_ADOPTED = "SessionAdopted"  # a restarted manager took over a live session
    SESSION_STATUS_CHANGED = "SessionStatusChanged"
    SESSION_READY = "SessionReady"
    SESSION_TERMINATED = "SessionTerminated"
    MICROSERVICE_DISPATCHED = "MicroserviceDispatched"
    MICROSERVICE_DISPATCH_FAILED = "MicroserviceDispatchFailed"
    MICROSERVICE_JOINED = "MicroserviceJoined"
    MICROSERVICE_LEFT = "MicroserviceLeft"
    CLIENT_JOINED = "ClientJoined"
    CLIENT_LEFT = "ClientLeft"
    MICROSERVICE_REGISTERED = "MicroserviceRegistered"
    MICROSERVICE_UPDATED = "MicroserviceUpdated"
    MICROSERVICE_DEREGISTERED = "MicroserviceDeregistered"
    MICROSERVICE_HEALTH_CHANGED = "MicroserviceHealthChanged"
    # Warm pools (`session_manager.pools`): a create served by a member, or not; a member
    # started, and one that ended unclaimed (expired, lost a service, or failed to fill).
    POOL_HIT = "PoolHit"
    POOL_MISS = "PoolMiss"
    POOL_REFILL = "PoolRefill"
    POOL_MEMBER_ENDED = "PoolMemberEnded"
    # Synthetic: a stream's notice that it skipped events (never stored in the log).
    EVENTS_DROPPED = "EventsDropped"


EVENT_TYPE_NAMES = frozenset(member.value for member in EventType)


def is_sensitive_key(key: object) -> bool:
    name = str(key).lower()
    return any(marker in name for marker in SENSITIVE_KEY_MARKERS)


def has_sensitive_key(value: Any) -> bool:
    """Whether `value` holds a credential-naming key anywhere; cheap, and nearly always False,
    so `scrub` (which copies) runs only when there is something to remove."""
    if isinstance(value, Mapping):
        return any(is_sensitive_key(k) or has_sensitive_key(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_sensitive_key(item) for item in value)
    return False


def scrub(value: Any, path: str, removed: list[str]) -> Any:
    """A copy of `value` without any mapping key that names a credential, at any depth; the
    dotted paths of the keys removed are appended to `removed`."""
    if isinstance(value, Mapping):
        kept: JsonDict = {}
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if is_sensitive_key(key):
                removed.append(where)
                continue
            kept[str(key)] = scrub(item, where, removed)
        return kept
    if isinstance(value, list | tuple):
        return [scrub(item, f"{path}[{index}]", removed) for index, item in enumerate(value)]
    return value


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened. `data` is scrubbed of credentials and must not be mutated."""

    id: int
    type: str
    timestamp: str  # RFC 3339 UTC, millisecond precision, 'Z'
    session_id: str | None = None
    service_id: str | None = None
    data: JsonDict = field(default_factory=dict)
    _json: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        removed: list[str] = []
        data = scrub(self.data, "", removed) if has_sensitive_key(self.data) else self.data
        if removed:
            log.warning(
                "credential removed from event data",
                extra={"event_type": self.type, "keys": ",".join(removed)},
            )
        object.__setattr__(self, "type", str(self.type))
        try:
            encoded = self._encode(data)
        except (TypeError, orjson.JSONEncodeError):
            log.exception("event data is not serializable", extra={"event_type": self.type})
            data = {"data_error": "event data could not be serialized"}
            encoded = self._encode(data)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "_json", encoded)

    def _encode(self, data: JsonDict) -> bytes:
        # Copied to an exact-size bytes: orjson's own result keeps a 4 KiB buffer however short
        # the JSON, and the log keeps up to `event_history` of these (measured: 4.8 KiB per
        # event before, under 1 KiB after).
        return bytes(memoryview(self._dumps(data)))

    def _dumps(self, data: JsonDict) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "type": self.type,
                "timestamp": self.timestamp,
                "session_id": self.session_id,
                "service_id": self.service_id,
                "data": data,
            },
            default=str,
            option=orjson.OPT_NON_STR_KEYS,
        )

    def to_json(self) -> bytes:
        """`{id, type, timestamp, session_id, service_id, data}` as JSON (made once, shared)."""
        return self._json

    def to_dict(self) -> JsonDict:
        decoded: JsonDict = orjson.loads(self._json)
        return decoded


class MissedReason(StrEnum):
    # The events were older than the history the log keeps: the reader was too slow, or came
    # back too late.
    HISTORY_EXCEEDED = "history_exceeded"
    # The reader's last event id is not one this log issued (e.g. from before a restart).
    UNKNOWN_LAST_EVENT_ID = "unknown_last_event_id"


@dataclass(frozen=True, slots=True)
class MissedEvents:
    """A stretch of ids a reader will never see.

    `first_id`..`last_id` bound the ids that were lost; on a filtered stream not every id in
    that range matched the filter, so `count` (the number of ids in the range) is then an upper
    bound. For an unknown last event id, the start of the loss is unknown: `first_id` and
    `count` are None.
    """

    first_id: int | None
    last_id: int
    reason: MissedReason

    @property
    def count(self) -> int | None:
        if self.first_id is None:
            return None
        return self.last_id - self.first_id + 1

    def to_data(self) -> JsonDict:
        return {
            "first_missed_id": self.first_id,
            "last_missed_id": self.last_id,
            "count": self.count,
            "reason": self.reason.value,
        }

    def notice(self, timestamp: str, session_id: str | None = None) -> Event:
        """The synthetic `EventsDropped` event a stream sends in place of the missed events.

        Its id is the last missed id, so a client resuming from it (Last-Event-ID) continues
        right after the gap instead of asking for it again.
        """
        return Event(
            id=self.last_id,
            type=EventType.EVENTS_DROPPED,
            timestamp=timestamp,
            session_id=session_id,
            data=self.to_data(),
        )


@dataclass(frozen=True, slots=True)
class EventPage:
    """What a read of the log found: the matching events, where to continue, and what was
    lost."""

    events: list[Event]
    next_id: int  # pass as `after_id` next time: every id up to it has been looked at
    missed: MissedEvents | None = None

    @property
    def gap(self) -> bool:
        return self.missed is not None
