"""LiveKit's webhooks, verified with the API secret and reduced to what a session reacts to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from livekit import api

# Attributes the manager puts in every token it mints, so a webhook says who a participant is
# instead of the manager guessing it from the identity string.
ROLE_ATTRIBUTE: Final = "session_manager.role"
SESSION_ATTRIBUTE: Final = "session_manager.session_id"
ROLE_CLIENT: Final = "client"
ROLE_SERVICE: Final = "service"


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
    role: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def is_participant_event(self) -> bool:
        return self.identity is not None


class WebhookVerifier:
    def __init__(self, api_key: str, api_secret: str) -> None:
        self._receiver = api.WebhookReceiver(api.TokenVerifier(api_key, api_secret))

    def verify(self, body: str, authorization: str) -> RoomEvent:
        if not authorization:
            raise WebhookRejected("missing Authorization header")
        try:
            event = self._receiver.receive(body, authorization)
        except Exception as exc:  # the receiver raises bare Exception and jwt errors alike
            raise WebhookRejected(str(exc) or type(exc).__name__) from None
        identity: str | None = None
        attributes: dict[str, str] = {}
        if event.HasField("participant") and event.participant.identity:
            identity = event.participant.identity
            attributes = dict(event.participant.attributes)
        return RoomEvent(
            kind=event.event,
            room_name=event.room.name,
            event_id=event.id,
            created_at=event.created_at,
            identity=identity,
            role=attributes.get(ROLE_ATTRIBUTE),
            attributes=attributes,
        )
