"""LiveKit webhook verification: signed with the API secret, bound to the body's hash."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable

import jwt
import orjson
import pytest

from session_manager.livekit.webhooks import (
    ROLE_ATTRIBUTE,
    WebhookRejected,
    WebhookVerifier,
    webhook_kind,
)

KEY, SECRET = "key", "a-secret-of-thirty-two-characters!"
BODY = orjson.dumps(
    {
        "event": "participant_joined",
        "id": "EV_1",
        "createdAt": "1795885654",
        "room": {"name": "room-1"},
        "participant": {"identity": "asr-1", "attributes": {ROLE_ATTRIBUTE: "service"}},
    }
)


def signature(body: bytes, *, secret: str = SECRET, issuer: str = KEY, ttl: int = 300) -> str:
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    claims = {"iss": issuer, "exp": int(time.time()) + ttl, "sha256": digest}
    return jwt.encode(claims, secret, algorithm="HS256")


def test_a_signed_webhook_becomes_a_room_event() -> None:
    event = WebhookVerifier(KEY, SECRET).verify(BODY, signature(BODY))
    assert (event.kind, event.room_name, event.identity, event.role) == (
        "participant_joined",
        "room-1",
        "asr-1",
        "service",
    )
    assert event.created_at == 1795885654


@pytest.mark.parametrize(
    ("make_auth", "reason"),
    [
        (lambda: "", "missing"),
        (lambda: signature(BODY, secret="another-secret-of-thirty-two-chars"), "bad signature"),
        (lambda: signature(BODY, issuer="someone-else"), "bad signature"),
        (lambda: signature(BODY, ttl=-60), "bad signature"),
        (lambda: signature(BODY.replace(b"asr-1", b"asr-2")), "does not match"),
    ],
)
def test_anything_else_is_rejected(make_auth: Callable[[], str], reason: str) -> None:
    # Signed when the test runs, not when it is collected: a slow run must not expire it.
    with pytest.raises(WebhookRejected, match=reason):
        WebhookVerifier(KEY, SECRET).verify(BODY, make_auth())


def test_the_kind_is_read_without_trusting_the_body() -> None:
    assert webhook_kind(BODY) == "participant_joined"
    assert webhook_kind(b"not json") is None
    assert webhook_kind(b"[1]") is None
    assert webhook_kind(b'{"event": 5}') is None


@pytest.mark.parametrize(
    "payload",
    [
        {"event": "participant_joined", "room": {"name": "r"}, "participant": ["not", "a", "map"]},
        {"event": "participant_joined", "room": ["r"], "participant": {"identity": "a"}},
        {"event": "participant_joined", "room": {"name": "r"}, "createdAt": "yesterday"},
        {"event": "participant_joined", "participant": {"identity": "a", "attributes": [1]}},
        [1, 2, 3],
    ],
)
def test_a_signed_body_not_shaped_like_a_webhook_is_rejected(payload: object) -> None:
    body = orjson.dumps(payload)
    with pytest.raises(WebhookRejected, match="not a LiveKit webhook"):
        WebhookVerifier(KEY, SECRET).verify(body, signature(body))
