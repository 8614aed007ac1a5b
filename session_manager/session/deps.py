"""What every session actor is given (SessionDeps), and what follows from a session for its room
and its tokens: the room's metadata (whose session, which deployment), how long tokens live, the
user's token. Shared by the actor, the supervisor (idempotent replays) and the takeover."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import orjson

from session_manager.dispatch import MicroserviceClient
from session_manager.events import EventLog
from session_manager.livekit.gateway import LiveKitGateway
from session_manager.livekit.webhooks import ROLE_ATTRIBUTE, ROLE_CLIENT, SESSION_ATTRIBUTE
from session_manager.registry import Registry
from session_manager.session.record import JsonDict, SessionRecord

# A token must outlive the session it is for; this margin covers joining late and reconnecting.
TOKEN_MARGIN = timedelta(minutes=10)


async def _nothing_to_persist(record: SessionRecord) -> None:
    return None


def _not_observed(seconds: float) -> None:
    return None


def _failover_not_observed(cause: str, seconds: float) -> None:
    return None


@dataclass(frozen=True)
class SessionDeps:
    """What every session actor uses, shared and owned by the daemon."""

    events: EventLog
    gateway: LiveKitGateway
    microservices: MicroserviceClient
    registry: Registry
    join_timeout: float
    room_empty_timeout: int
    client_token_ttl: float
    teardown_timeout: float
    max_redispatch: int = 3
    client_join_timeout: float = 300.0
    client_reconnect_grace: float = 60.0
    deployment: str = "default"  # tags the rooms this deployment creates
    max_session_duration: float = 86400.0  # caps every client token's lifetime (plus margins)
    # Makes a new session durable (in a cluster: owned, with its places on its instances) before
    # its room is created, so a crash never leaves a room no stored session claims.
    persist: Callable[[SessionRecord], Awaitable[None]] = _nothing_to_persist
    # Told the seconds from a session's creation to its first Ready (metrics); must not block.
    on_ready: Callable[[float], None] = _not_observed
    # Told a failover's cause and its seconds from the loss to the new occupant's join.
    on_failover: Callable[[str, float], None] = _failover_not_observed


def duration_limit(metadata: JsonDict) -> float | None:
    value = metadata.get("duration_limit")
    return float(value) if value is not None else None


ROOM_TAG = "session_manager"  # room metadata key: the deployment that created the room


def room_metadata(deployment: str, record: SessionRecord) -> str:
    """A room's metadata: whose session it is, and a tag naming the deployment that created it,
    so rooms it no longer knows (a delete that failed, a crash) can be found and deleted."""
    return orjson.dumps(
        {
            "session_id": record.session_id,
            "user_identity": record.user_identity,
            ROOM_TAG: deployment,
        }
    ).decode()


def _room_field(metadata: str, name: str) -> str | None:
    try:
        parsed = orjson.loads(metadata)
    except orjson.JSONDecodeError:
        return None
    value = parsed.get(name) if isinstance(parsed, dict) else None
    return value if isinstance(value, str) else None


def created_by(metadata: str) -> str | None:
    """The deployment a room's metadata names, if it is one of ours."""
    return _room_field(metadata, ROOM_TAG)


def room_session(metadata: str) -> str | None:
    """The session a room of ours was created for, from its metadata."""
    return _room_field(metadata, "session_id")


# Seconds LiveKit keeps a room past the manager's own deadline for the user, so that the
# manager, not LiveKit, ends the session, with its reason.
ROOM_CLOSE_MARGIN = 30


def room_timeouts(deps: SessionDeps) -> tuple[int, int]:
    """A session's room's (empty_timeout, departure_timeout). Services join as LiveKit agents,
    and LiveKit closes a room where only agents are: `empty_timeout` after its creation when
    no user joined yet, `departure_timeout` (20 s by default) after the last one left. Both
    are set to outlast the manager's `client_join_timeout` and `client_reconnect_grace`."""
    empty = max(deps.room_empty_timeout, math.ceil(deps.client_join_timeout) + ROOM_CLOSE_MARGIN)
    departure = math.ceil(deps.client_reconnect_grace) + ROOM_CLOSE_MARGIN
    return empty, departure


def token_ttl(deps: SessionDeps, metadata: JsonDict) -> timedelta:
    """How long the tokens of a session live: its duration limit plus the time to join and a
    margin for reconnecting, or `client_token_ttl` for a session without a limit; never longer
    than `max_session_duration` with the same margins."""
    cap = timedelta(seconds=deps.max_session_duration + deps.join_timeout) + TOKEN_MARGIN
    limit = duration_limit(metadata)
    if limit is None:
        return min(timedelta(seconds=deps.client_token_ttl), cap)
    return min(timedelta(seconds=limit + deps.join_timeout) + TOKEN_MARGIN, cap)


def mint_client_token(deps: SessionDeps, record: SessionRecord) -> str:
    """The user's token for the session's room. Minted again (never stored) when an
    Idempotency-Key replay answers with the session it created."""
    return deps.gateway.mint_token(
        identity=record.user_identity,
        name=record.user_name,
        room_name=record.room_name,
        ttl=token_ttl(deps, record.metadata),
        attributes={ROLE_ATTRIBUTE: ROLE_CLIENT, SESSION_ATTRIBUTE: record.session_id},
    )
