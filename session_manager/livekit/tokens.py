"""LiveKit access tokens (HS256 JWTs), signed here directly with PyJWT.

livekit-api's AccessToken builds its claims through `dataclasses.asdict` (a deep copy) on every
call; on the create-session path that was a fifth of the manager's CPU. The claims are few and
fixed, so they are written out here; tests check them with livekit-api's own TokenVerifier.
"""

from __future__ import annotations

import time
from datetime import timedelta

import jwt

# Server-side token for the manager's own API calls: reused until close to its expiry.
SERVER_TOKEN_TTL = 600.0
SERVER_TOKEN_REFRESH = 300.0

# LiveKit's participant kinds, as a token's `kind` claim names them (livekit-api's
# `AccessToken.with_kind`; livekit-server reads the claim as `ParticipantInfo.Kind`).
KIND_AGENT = "agent"


class TokenMinter:
    def __init__(self, api_key: str, api_secret: str) -> None:
        self._api_key = api_key
        self._api_secret = api_secret

    def participant(
        self,
        *,
        identity: str,
        room_name: str,
        ttl: timedelta,
        name: str | None = None,
        attributes: dict[str, str] | None = None,
        kind: str | None = None,
    ) -> str:
        """May join `room_name` only; may publish, subscribe and send data. `kind`: LiveKit's
        participant kind (`KIND_AGENT`); none is a standard participant."""
        video = {
            "roomJoin": True,
            "room": room_name,
            "canPublish": True,
            "canSubscribe": True,
            "canPublishData": True,
        }
        claims: dict[str, object] = {"video": video}
        if name:
            claims["name"] = name
        if attributes:
            claims["attributes"] = attributes
        if kind:
            claims["kind"] = kind
        return self._sign(identity, ttl.total_seconds(), claims)

    def server(self) -> str:
        """For the manager's own calls to LiveKit's server API (create, list, delete rooms)."""
        video = {"roomCreate": True, "roomList": True, "roomAdmin": True}
        return self._sign("", SERVER_TOKEN_TTL, {"video": video})

    def _sign(self, subject: str, ttl: float, claims: dict[str, object]) -> str:
        now = int(time.time())
        payload = {**claims, "iss": self._api_key, "nbf": now, "exp": now + int(ttl)}
        if subject:
            payload["sub"] = subject
        return jwt.encode(payload, self._api_secret, algorithm="HS256")
