"""Trusting the manager's calls: Standard Webhooks signatures, a 5-minute window, no replays;
and the LiveKit servers the service agrees to connect to.

The manager signs every join-room, leave-room and health call with the registration's secret
(`whsec_…`, handed to the service in the register answer):

    webhook-id: msg_…
    webhook-timestamp: <unix seconds>
    webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{raw body}")> [v1,… …]

`CallVerifier` refuses a call that is unsigned, badly signed, more than 5 minutes off this
machine's clock, or replayed (a `webhook-id` it accepted within the last 10 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from urllib.parse import urlsplit

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SIGNED_HEADERS = (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)

TOLERANCE = 300  # seconds a call's timestamp may be off (the standardwebhooks libraries' window)
# An id accepted is remembered this long: its timestamp may have been up to TOLERANCE ahead.
REPLAY_WINDOW = 2 * TOLERANCE
MAX_REMEMBERED = 100_000  # ids remembered at most (only of calls that verified)
MAX_ID_LENGTH = 256
SECRET_WAIT = 5.0  # seconds a signed call waits for the secret of a registration in flight

UNSIGNED = "call not signed"
BAD_SIGNATURE = "signature does not match"
OUT_OF_WINDOW = "timestamp more than 5 minutes off"
REPLAYED = "call replayed"
NO_SECRET = "no signing secret known yet"


class CallVerifier:
    """Checks that a call comes from the manager. Holds one secret at a time: a registration
    or a rotation replaces it at once.

    While a registration or a rotation is in flight (`expecting_secret`), a signed call that
    does not verify waits up to `secret_wait` seconds for the new secret before it is refused:
    the manager may use the new secret a moment before its answer reaches this process."""

    def __init__(
        self,
        secret: str | None = None,
        *,
        secret_wait: float = SECRET_WAIT,
        max_remembered: int = MAX_REMEMBERED,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._hook: Webhook | None = None
        self._secret_wait = secret_wait
        self._max_remembered = max_remembered
        self._clock = clock
        self._wall_clock = wall_clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # webhook-id -> forget after
        self._expecting = 0
        self._changed = asyncio.Event()
        if secret is not None:
            self.set_secret(secret)

    @property
    def has_secret(self) -> bool:
        return self._hook is not None

    def set_secret(self, secret: str) -> None:
        """Verify with `secret` (`whsec_…`) from now on. ValueError if it is not one."""
        if not secret:
            raise ValueError("the signing secret is empty")
        try:
            self._hook = Webhook(secret)
        except Exception:  # the library's own errors for an empty or undecodable secret
            raise ValueError("the signing secret is not a whsec_ secret") from None
        self._wake()

    @contextlib.contextmanager
    def expecting_secret(self) -> Iterator[None]:
        """Around a registration or rotation: calls signed with the coming secret wait for it."""
        self._expecting += 1
        try:
            yield
        finally:
            self._expecting -= 1
            self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def verify(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        """None when the call is the manager's and new; else why it is refused."""
        values = {name: headers.get(name, "") for name in SIGNED_HEADERS}
        if not all(values.values()):
            return UNSIGNED
        if len(values[ID_HEADER]) > MAX_ID_LENGTH:
            return BAD_SIGNATURE
        try:
            sent_at = int(values[TIMESTAMP_HEADER])
        except ValueError:
            return OUT_OF_WINDOW
        if abs(self._wall_clock() - sent_at) > TOLERANCE:
            return OUT_OF_WINDOW
        failure = self._check_signature(body, values)
        if failure is not None and self._expecting:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self._secret_wait)
            failure = self._check_signature(body, values)
        if failure is not None:
            return failure
        return REPLAYED if self._replayed(values[ID_HEADER]) else None

    def _check_signature(self, body: bytes, headers: dict[str, str]) -> str | None:
        if self._hook is None:
            return NO_SECRET
        try:
            self._hook.verify(body, headers, json_parse=False)
        except (WebhookVerificationError, ValueError):  # ValueError: malformed, not UTF-8
            return BAD_SIGNATURE
        return None

    def _replayed(self, msg_id: str) -> bool:
        """Whether `msg_id` was accepted before; remembers it if not."""
        now = self._clock()
        while self._seen:
            oldest, forget_after = next(iter(self._seen.items()))
            if forget_after > now and len(self._seen) < self._max_remembered:
                break
            del self._seen[oldest]
        if msg_id in self._seen:
            return True
        self._seen[msg_id] = now + REPLAY_WINDOW
        return False


def livekit_url_key(url: str) -> str | None:
    """A LiveKit URL compared by what it points at: ws and http (wss and https) alike, host in
    lower case, default port filled in, no trailing '/'. None when it is not a URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in ("ws", "wss") or not parts.hostname:
        return None
    host = parts.hostname.lower().rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    port = port or (443 if scheme == "wss" else 80)
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


class TrustedLiveKit:
    """The LiveKit servers a join-room may send the service to: the one the manager reported
    at registration plus those the service was configured with."""

    def __init__(self, configured: Iterable[str] = ()) -> None:
        self._configured: set[str] = set()
        for url in configured:
            key = livekit_url_key(url)
            if key is None:
                raise ValueError(f"trusted LiveKit URL {url!r} is not a ws(s):// or http(s):// URL")
            self._configured.add(key)
        self._reported: str | None = None

    @property
    def empty(self) -> bool:
        return not self._configured and self._reported is None

    def report(self, url: str | None) -> None:
        """The LiveKit URL the manager hands out (from its register or rotate answer)."""
        key = livekit_url_key(url) if url else None
        if key is not None:
            self._reported = key

    def trusts(self, url: str) -> bool:
        key = livekit_url_key(url)
        return key is not None and (key == self._reported or key in self._configured)
