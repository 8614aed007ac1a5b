"""How outbound webhooks are signed, and how a receiver checks them.

Every webhook POST carries:

    Content-Type: application/json
    X-SessionManager-Event-Id: 1712345678901234
    X-SessionManager-Event-Type: SessionReady
    X-SessionManager-Timestamp: 1712345679            (unix seconds when this attempt was sent)
    X-SessionManager-Signature: sha256=<hex>

where `<hex>` is HMAC-SHA256 keyed with the configured webhook secret over the bytes
`<timestamp>.<raw body>`. A retry is signed again with its own timestamp. Receivers should check
the signature against the raw body (before parsing it), refuse timestamps too far from their
clock (replays), and de-duplicate on the event id (delivery is at least once):

    import hashlib, hmac, time

    def verify(secret: bytes, headers, body: bytes, tolerance: int = 300) -> bool:
        timestamp = headers["X-SessionManager-Timestamp"]
        if abs(time.time() - int(timestamp)) > tolerance:
            return False
        expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest("sha256=" + expected, headers["X-SessionManager-Signature"])

`verify_signature` below does the same (and accepts several comma-separated signatures, so a
secret can be rotated).
"""

from __future__ import annotations

import hashlib
import hmac
import time

EVENT_ID_HEADER = "X-SessionManager-Event-Id"
EVENT_TYPE_HEADER = "X-SessionManager-Event-Type"
TIMESTAMP_HEADER = "X-SessionManager-Timestamp"
SIGNATURE_HEADER = "X-SessionManager-Signature"
ATTEMPT_HEADER = "X-SessionManager-Delivery-Attempt"
SIGNATURE_SCHEME = "sha256="
DEFAULT_TOLERANCE = 300.0


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp` (unix seconds)."""
    message = str(timestamp).encode() + b"." + body
    return SIGNATURE_SCHEME + hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str | bytes,
    timestamp: int | str,
    body: bytes,
    header: str,
    *,
    tolerance: float | None = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """Whether `header` signs `body` at `timestamp` with `secret`, and the timestamp is within
    `tolerance` seconds of `now` (None: no age check)."""
    try:
        sent_at = int(str(timestamp).strip())
    except ValueError:
        return False
    if tolerance is not None:
        current = time.time() if now is None else now
        if abs(current - sent_at) > tolerance:
            return False
    expected = sign(secret, sent_at, body)
    candidates = (part.strip() for part in header.split(","))
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)
