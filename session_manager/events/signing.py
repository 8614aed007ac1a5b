"""Standard Webhooks signing: one scheme for everything the manager sends that a receiver may
want to trust, the outbound event webhooks and the join-room, leave-room and health calls to
microservices (https://www.standardwebhooks.com/, done with the `standardwebhooks` package).

Every signed request carries

    webhook-id: <the message's id>
    webhook-timestamp: <unix seconds when this attempt was sent>
    webhook-signature: v1,<base64 of HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>

where `body` is the raw request body (empty for a GET). `webhook-signature` may hold several
signatures separated by spaces; one that verifies is enough. The key is given as a secret
`whsec_<base64 of the key bytes>`; the `standardwebhooks` libraries (Python, JavaScript, Go, …)
take that string as it is:

    from standardwebhooks import Webhook
    Webhook("whsec_…").verify(raw_body, headers)   # raises when unsigned, forged or > 5 min off

A receiver checks the signature on the raw body before parsing it, refuses a timestamp more than
5 minutes from its clock, and remembers the ids it accepted for longer than that so a replay is
refused (event webhooks: a retry keeps its id, so the id also de-duplicates deliveries).

`webhook_secret` (outbound events) may be a plain string instead of a `whsec_…`: its UTF-8 bytes
are then the key, and receivers are given `as_whsec(plain)`, i.e. "whsec_" + base64(plain).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks asks for 24 to 64 random bytes
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
TOLERANCE = 300  # seconds a timestamp may be off (the standardwebhooks libraries' fixed window)
# Extra headers of the event webhooks, outside the signature scheme.
EVENT_TYPE_HEADER = "X-SessionManager-Event-Type"
ATTEMPT_HEADER = "X-SessionManager-Delivery-Attempt"

Secret = str | bytes


def new_secret() -> str:
    """A fresh signing secret: `whsec_` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def new_message_id() -> str:
    return "msg_" + secrets.token_urlsafe(18)


def signing_key(secret: Secret) -> bytes:
    """The HMAC key of a secret: bytes as they are; `whsec_…` its base64 decoded; any other
    string its UTF-8 bytes. ValueError for an empty key or a `whsec_` that is not base64."""
    if isinstance(secret, bytes):
        key = secret
    elif secret.startswith(SECRET_PREFIX):
        encoded = secret[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be base64 after its prefix") from None
    else:
        key = secret.encode()
    if not key:
        raise ValueError("a signing secret must not be empty")
    return key


def as_whsec(secret: Secret) -> str:
    """The `whsec_…` form of a secret: what a receiver is configured with."""
    return SECRET_PREFIX + base64.b64encode(signing_key(secret)).decode()


class Signer:
    """Signs bodies with one or more secrets (one signature each, in the order given)."""

    def __init__(self, *secrets: Secret) -> None:
        if not secrets:
            raise ValueError("a Signer needs at least one secret")
        self._hooks = [Webhook(signing_key(secret)) for secret in secrets]

    def headers(
        self, body: bytes, *, msg_id: str | None = None, timestamp: int | None = None
    ) -> dict[str, str]:
        """The three Standard Webhooks headers for `body` (UTF-8; empty for a GET), sent now
        unless `timestamp` (unix seconds) says otherwise."""
        msg_id = msg_id or new_message_id()
        sent_at = datetime.fromtimestamp(
            timestamp if timestamp is not None else int(datetime.now(UTC).timestamp()), UTC
        )
        text = body.decode()
        signatures = " ".join(hook.sign(msg_id, sent_at, text) for hook in self._hooks)
        return {
            ID_HEADER: msg_id,
            TIMESTAMP_HEADER: str(int(sent_at.timestamp())),
            SIGNATURE_HEADER: signatures,
        }


def sign_headers(
    secret: Secret, body: bytes, *, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers for `body` signed with `secret`."""
    return Signer(secret).headers(body, msg_id=msg_id, timestamp=timestamp)


def verify_signature(secret: Secret, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether `headers` sign `body` with `secret` at a timestamp within 5 minutes of now (no
    replay check: that needs memory of the ids seen, see the SDK's `CallVerifier`)."""
    try:
        Webhook(signing_key(secret)).verify(body, dict(headers), json_parse=False)
    except (WebhookVerificationError, ValueError):  # ValueError: a malformed signature
        return False
    return True
