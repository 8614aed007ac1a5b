"""Scrubbing secrets out of text that is about to be logged or sent back over HTTP."""

from __future__ import annotations

import re

REDACTED = "[redacted]"

# LiveKit puts the access token in the signalling URL's query string, and connection errors from
# the native SDK may quote that URL.
_TOKEN_QUERY = re.compile(r"((?:access_token|token)=)[^&\s'\"]+", re.IGNORECASE)


def redact(text: str, *secrets: str) -> str:
    """`text` with every given secret and every token query parameter replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _TOKEN_QUERY.sub(rf"\g<1>{REDACTED}", text)


def describe_error(error: BaseException, *secrets: str) -> str:
    """A one-line, secret-free description of an exception for logs and HTTP answers."""
    # livekit's ConnectError keeps its text in `.message`; other exceptions in str().
    detail = getattr(error, "message", None)
    if not isinstance(detail, str) or not detail:
        detail = str(error)
    name = type(error).__name__
    return redact(f"{name}: {detail}" if detail else name, *secrets)
