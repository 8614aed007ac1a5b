"""LiveKit's webhooks, verified with the API secret and reduced to what a session reacts to."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
import orjson

# Attributes the manager puts in every token it mints, so a webhook says who a participant is
# instead of the manager guessing it from the identity string.
ROLE_ATTRIBUTE: Final = "session_manager.role"
SESSION_ATTRIBUTE: Final = "session_manager.session_id"
ROLE_CLIENT: Final = "client"
ROLE_SERVICE: Final = "service"
# A livekit-agents worker's participant: LiveKit's kind AGENT, none of our attributes, and the
# agent name livekit-agents puts in its attributes (the server adds the second spelling; seen
# on livekit-server v1.13.5 with livekit-agents 1.8.9). Its identity (`agent-AJ_…`, the job's
# id) is chosen by the framework, so it is never what recognises it.
ROLE_AGENT: Final = "agent"
KIND_AGENT: Final = "AGENT"
AGENT_NAME_ATTRIBUTES: Final = ("lk.agent.name", "lk.agent_name")


class WebhookRejected(Exception):
    """The body or its signature did not verify."""


@dataclass(frozen=True)
class RoomEvent:
    """A LiveKit webhook about a room or one of its participants."""

    kind: str  # room_started, room_finished, participant_joined, participant_left, ...
    room_name: str
    event_id: str = ""
    created_at: int = 0
    identity: str | None = None
    participant_sid: str = ""  # one connection of `identity`: a reconnect gets a new one
    role: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    participant_kind: str = ""  # LiveKit's ParticipantInfo.Kind by name: STANDARD, AGENT, ...

    @property
    def agent_name(self) -> str | None:
        """The agent name of a livekit-agents worker's participant; None for anyone else (our
        own services are of kind AGENT too, but carry our role attribute)."""
        if self.participant_kind != KIND_AGENT or ROLE_ATTRIBUTE in self.attributes:
            return None
        for key in AGENT_NAME_ATTRIBUTES:
            if self.attributes.get(key):
                return self.attributes[key]
        return None


def participant_present(
    room_name: str, identity: str, sid: str, attributes: dict[str, str], kind: str = ""
) -> RoomEvent:
    """A participant found in a room by asking LiveKit (not by a webhook), as the
    participant_joined event that would have announced it."""
    return RoomEvent(
        kind="participant_joined",
        room_name=room_name,
        identity=identity or None,
        participant_sid=sid,
        role=attributes.get(ROLE_ATTRIBUTE),
        attributes=attributes,
        participant_kind=kind,
    )


# The only webhooks a session reacts to; LiveKit sends many more (room_started,
# track_published, ...), and each create-session alone brings a room_started.
RELEVANT_KINDS = frozenset({"participant_joined", "participant_left", "room_finished"})
LEEWAY_SECONDS = 10


def webhook_kind(body: bytes) -> str | None:
    """The `event` field of a webhook body, read without trusting anything else in it."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    kind = payload.get("event") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


class WebhookVerifier:
    """Checks LiveKit's signature: a JWT signed with the API secret, issued by the API key,
    whose `sha256` claim is the base64 SHA-256 of the body. Written against PyJWT and orjson
    directly: livekit-api's receiver parses the body through protobuf's JSON reader, which
    cost more than everything else a webhook needs."""

    def __init__(self, api_key: str, api_secret: str) -> None:
        self._api_key = api_key
        self._api_secret = api_secret

    def verify(self, body: bytes, authorization: str) -> RoomEvent:
        if not authorization:
            raise WebhookRejected("missing Authorization header")
        token = authorization.removeprefix("Bearer ").strip()
        try:
            claims = jwt.decode(
                token,
                self._api_secret,
                algorithms=["HS256"],
                issuer=self._api_key,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss"]},
            )
        except jwt.PyJWTError as exc:
            raise WebhookRejected(f"bad signature: {exc}") from None
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        if not hmac.compare_digest(str(claims.get("sha256", "")), digest):
            raise WebhookRejected("body does not match its signature")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise WebhookRejected("body is not JSON") from None
        try:
            return _room_event(payload)
        except (AttributeError, TypeError, ValueError):
            # Signed, but not shaped like LiveKit's webhooks (a list where an object goes...).
            raise WebhookRejected("body is not a LiveKit webhook") from None


def _room_event(payload: dict[str, Any]) -> RoomEvent:
    participant = payload.get("participant") or {}
    identity = participant.get("identity") or None
    attributes = (
        {str(k): str(v) for k, v in (participant.get("attributes") or {}).items()}
        if identity
        else {}
    )
    return RoomEvent(
        kind=str(payload.get("event", "")),
        room_name=str((payload.get("room") or {}).get("name", "")),
        event_id=str(payload.get("id", "")),
        created_at=int(payload.get("createdAt", 0) or 0),
        identity=identity,
        participant_sid=str(participant.get("sid") or ""),
        role=attributes.get(ROLE_ATTRIBUTE),
        attributes=attributes,
        participant_kind=str(participant.get("kind") or "") if identity else "",
    )
