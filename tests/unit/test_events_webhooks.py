"""Outbound webhooks against real receivers on 127.0.0.1: signatures, retries, order per session,
type filters, the bounded queue, shutdown; and the signature helpers receivers use.

Signatures are Standard Webhooks: receivers here verify them with the `standardwebhooks`
package, as the README tells a receiver to."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import orjson
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from session_manager.events import (
    EVENT_TYPE_HEADER,
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Event,
    EventLog,
    EventType,
    OutboundWebhooks,
    WebhookPolicy,
    WebhookTarget,
    as_whsec,
    sign_headers,
    verify_signature,
)
from tests.conftest import free_port
from tests.polling import eventually

T = EventType
SECRET = "whsec_" + base64.b64encode(b"outbound-webhook-test-key-32-byte").decode()
FAST = WebhookPolicy(timeout=2.0, max_attempts=4, base_backoff=0.01, max_backoff=0.05)

Answer = Callable[["Delivery"], Awaitable[int]]


@dataclass
class Delivery:
    """One request the receiver got."""

    body: bytes
    headers: dict[str, str]
    status: int = 0

    @property
    def event(self) -> dict[str, object]:
        decoded: dict[str, object] = orjson.loads(self.body)
        return decoded

    @property
    def event_id(self) -> int:
        return int(self.headers[ID_HEADER])


@dataclass
class Receiver:
    """A webhook receiver answering each request with `answer(delivery)` (default 200)."""

    url: str = ""
    requests: list[Delivery] = field(default_factory=list)
    answer: Answer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        delivery = Delivery(await request.read(), dict(request.headers))
        self.requests.append(delivery)
        delivery.status = await self.answer(delivery) if self.answer else 200
        return web.Response(status=delivery.status)

    @property
    def accepted(self) -> list[Delivery]:
        return [delivery for delivery in self.requests if delivery.status == 200]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with _serve() as started:
        yield started


class _serve:
    def __init__(self) -> None:
        self.receiver = Receiver()
        app = web.Application()
        app.router.add_post("/hook", self.receiver.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)

    async def __aenter__(self) -> Receiver:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.receiver.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self.receiver

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


@pytest.fixture
async def make_webhooks() -> AsyncIterator[Callable[..., Awaitable[OutboundWebhooks]]]:
    started: list[OutboundWebhooks] = []

    async def make(
        *targets: WebhookTarget, policy: WebhookPolicy = FAST, secret: str = SECRET
    ) -> OutboundWebhooks:
        webhooks = OutboundWebhooks(targets, secret, policy)
        await webhooks.start()
        started.append(webhooks)
        return webhooks

    yield make
    for webhooks in started:
        await webhooks.aclose(timeout=1.0)


def interleaved_sessions(log: EventLog, per_session: int = 5) -> list[Event]:
    events = []
    for n in range(per_session):
        events.append(log.append(T.SESSION_STATUS_CHANGED, session_id="a", data={"n": n}))
        events.append(log.append(T.SESSION_STATUS_CHANGED, session_id="b", data={"n": n}))
    return events


def documented_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver snippet of the README: the `standardwebhooks` package, on the raw body."""
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


def assert_signed(delivery: Delivery, secret: str = SECRET) -> None:
    assert delivery.headers["Content-Type"] == "application/json"
    assert documented_verify(secret, delivery.headers, delivery.body)
    assert verify_signature(secret, delivery.headers, delivery.body)
    # One scheme: nothing of the old X-SessionManager-* signature is left.
    assert not {"X-SessionManager-Signature", "X-SessionManager-Timestamp"} & set(delivery.headers)


# delivery ------------------------------------------------------------------------------------


async def test_a_receiver_that_fails_twice_gets_every_event_once_signed_in_order(
    receiver: Receiver, make_webhooks: Callable[..., Awaitable[OutboundWebhooks]]
) -> None:
    async def fail_twice(delivery: Delivery) -> int:
        return 500 if len(receiver.requests) <= 2 else 200

    receiver.answer = fail_twice
    target = WebhookTarget(receiver.url)
    webhooks = await make_webhooks(target)
    log = EventLog(first_id=1)
    log.add_listener(webhooks.offer)

    events = interleaved_sessions(log)
    # The sender counts a delivery once it has read the answer, after the receiver sent it.
    await eventually(lambda: webhooks.stats()[target].delivered == len(events))

    accepted = receiver.accepted
    assert sorted(delivery.event_id for delivery in accepted) == [event.id for event in events]
    for delivery in accepted:
        assert_signed(delivery)
        assert delivery.event == orjson.loads(delivery.body)
        assert delivery.event["id"] == delivery.event_id
        assert delivery.headers[EVENT_TYPE_HEADER] == delivery.event["type"]
    for delivery in receiver.requests:  # retries too: signed again, under the event's id
        assert_signed(delivery)
        assert delivery.event_id == delivery.event["id"]
    for session in ("a", "b"):
        # Every request for a session, failed ones included: never ahead of an earlier event.
        tried = [d.event_id for d in receiver.requests if d.event["session_id"] == session]
        assert tried == sorted(tried)
        delivered = [d.event_id for d in accepted if d.event["session_id"] == session]
        assert delivered == [event.id for event in events if event.session_id == session]
    stats = webhooks.stats()[target]
    assert (stats.delivered, stats.retried, stats.failed, stats.dropped) == (10, 2, 0, 0)
    assert stats.queued == 0


async def test_an_event_is_given_up_after_max_attempts_and_the_next_one_still_goes(
    receiver: Receiver, make_webhooks: Callable[..., Awaitable[OutboundWebhooks]]
) -> None:
    log = EventLog(first_id=1)

    async def refuse_the_first(delivery: Delivery) -> int:
        return 503 if delivery.event_id == 1 else 200

    receiver.answer = refuse_the_first
    target = WebhookTarget(receiver.url)
    webhooks = await make_webhooks(target)
    log.add_listener(webhooks.offer)
    log.append(T.SESSION_CREATED, session_id="s")
    log.append(T.SESSION_READY, session_id="s")

    # Both events have an outcome in the sender's books: nothing more will be sent for them.
    await eventually(lambda: webhooks.stats()[target].delivered == 1)
    assert [d.event_id for d in receiver.requests] == [1, 1, 1, 1, 2]
    stats = webhooks.stats()[target]
    assert (stats.delivered, stats.failed, stats.retried) == (1, 1, 3)


async def test_a_client_error_is_final_and_429_is_retried(
    receiver: Receiver, make_webhooks: Callable[..., Awaitable[OutboundWebhooks]]
) -> None:
    answers = {1: [400], 2: [429, 200]}

    async def scripted(delivery: Delivery) -> int:
        return answers[delivery.event_id].pop(0)

    receiver.answer = scripted
    target = WebhookTarget(receiver.url)
    webhooks = await make_webhooks(target)
    webhooks.offer(Event(1, T.SESSION_CREATED, "2024-01-01T00:00:00.000Z", session_id="x"))
    webhooks.offer(Event(2, T.SESSION_CREATED, "2024-01-01T00:00:00.000Z", session_id="y"))

    # Wait until the sender is done with both events (one delivered, one given up): any retry
    # of the 400 would have been sent by then. Had the 400 been retried, event 1 would be
    # given up only after max_attempts requests.
    await eventually(
        lambda: webhooks.stats()[target].delivered + webhooks.stats()[target].failed == 2
    )
    assert sorted(d.event_id for d in receiver.requests) == [1, 2, 2]
    assert [d.status for d in receiver.requests if d.event_id == 1] == [400]
    stats = webhooks.stats()[target]
    assert (stats.delivered, stats.failed, stats.retried) == (1, 1, 1)


async def test_an_unreachable_receiver_is_retried_then_counted_as_failed(
    make_webhooks: Callable[..., Awaitable[OutboundWebhooks]],
) -> None:
    target = WebhookTarget(f"http://127.0.0.1:{free_port()}/hook")
    webhooks = await make_webhooks(target)
    log = EventLog(first_id=1)
    log.add_listener(webhooks.offer)
    log.append(T.SESSION_CREATED, session_id="s")

    await eventually(lambda: webhooks.stats()[target].failed == 1)
    stats = webhooks.stats()[target]
    assert (stats.retried, stats.delivered, stats.queued) == (FAST.max_attempts - 1, 0, 0)


async def test_targets_get_only_the_types_they_asked_for(
    make_webhooks: Callable[..., Awaitable[OutboundWebhooks]],
) -> None:
    async with _serve() as everything, _serve() as endings:
        only_endings = WebhookTarget(endings.url, frozenset({"SessionTerminated"}))
        await_all = await make_webhooks(WebhookTarget(everything.url), only_endings)
        log = EventLog(first_id=1)
        log.add_listener(await_all.offer)
        log.append(T.SESSION_CREATED, session_id="s")
        log.append(T.MICROSERVICE_REGISTERED, service_id="asr-1")
        ended = log.append(T.SESSION_TERMINATED, session_id="s", data={"reason": "done"})

        await eventually(lambda: len(everything.accepted) == 3)
        await await_all.aclose(timeout=1.0)
        assert [d.event_id for d in endings.accepted] == [ended.id]
        assert endings.accepted[0].event["data"] == {"reason": "done"}


async def test_a_full_queue_drops_new_events_and_counts_them(
    receiver: Receiver, make_webhooks: Callable[..., Awaitable[OutboundWebhooks]]
) -> None:
    release = asyncio.Event()

    async def hold(delivery: Delivery) -> int:
        await release.wait()
        return 200

    receiver.answer = hold
    target = WebhookTarget(receiver.url)
    webhooks = await make_webhooks(target, policy=WebhookPolicy(max_queue=3, base_backoff=0.01))
    log = EventLog(first_id=1)
    log.add_listener(webhooks.offer)
    for _ in range(10):
        log.append(T.SESSION_STATUS_CHANGED, session_id="s")  # never waits on the receiver
    assert log.last_id == 10
    stats = webhooks.stats()[target]
    assert (stats.queued, stats.dropped) == (3, 7)

    release.set()
    await eventually(lambda: webhooks.stats()[target].delivered == 3)
    assert [d.event_id for d in receiver.accepted] == [1, 2, 3]
    log.append(T.SESSION_TERMINATED, session_id="s")  # room again once the queue drained
    await eventually(lambda: len(receiver.accepted) == 4)
    assert receiver.accepted[-1].event_id == 11


async def test_aclose_delivers_what_is_queued_before_returning(
    receiver: Receiver,
) -> None:
    target = WebhookTarget(receiver.url)
    webhooks = OutboundWebhooks([target], SECRET, FAST)
    await webhooks.start()
    log = EventLog(first_id=1)
    log.add_listener(webhooks.offer)
    interleaved_sessions(log)

    await webhooks.aclose(timeout=5.0)

    assert sorted(d.event_id for d in receiver.accepted) == list(range(1, 11))
    assert webhooks.stats()[target].delivered == 10
    log.append(T.SESSION_CREATED, session_id="late")
    assert webhooks.stats()[target].dropped == 1
    await webhooks.aclose()  # twice is fine


async def test_aclose_gives_up_after_its_timeout_and_leaves_no_task_behind(
    receiver: Receiver,
) -> None:
    release = asyncio.Event()
    answered: list[int] = []

    async def hold(delivery: Delivery) -> int:
        await release.wait()
        answered.append(delivery.event_id)
        return 200

    receiver.answer = hold
    target = WebhookTarget(receiver.url)
    # No attempt can end by itself (the receiver holds it, the request timeout is far off):
    # only aclose's own timeout can end its wait for the queue to drain.
    webhooks = OutboundWebhooks([target], SECRET, replace(FAST, timeout=600.0))
    await webhooks.start()
    for n in range(3):
        webhooks.offer(Event(n + 1, T.CLIENT_JOINED, "2024-01-01T00:00:00.000Z", session_id="s"))
    await eventually(lambda: len(receiver.requests) == 1)

    # A hang guard, not a measure: an aclose that waited for the held delivery never returns.
    await asyncio.wait_for(webhooks.aclose(timeout=0.2), 60)

    assert answered == []  # returned while the first delivery was still held
    stats = webhooks.stats()[target]
    assert (stats.delivered, stats.failed, stats.retried) == (0, 0, 0)
    assert (stats.dropped, stats.queued) == (3, 0)
    assert len(receiver.requests) == 1  # the other two were never sent
    leftovers = [task for task in asyncio.all_tasks() if task.get_name().startswith("webhook-")]
    assert leftovers == []
    release.set()


async def test_no_targets_means_nothing_to_start_and_no_secret_needed() -> None:
    webhooks = OutboundWebhooks([], "")
    await webhooks.start()
    webhooks.offer(Event(1, T.SESSION_CREATED, "2024-01-01T00:00:00.000Z"))
    await webhooks.aclose()
    assert webhooks.stats() == {}


def test_targets_need_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        OutboundWebhooks([WebhookTarget("http://127.0.0.1:9/hook")], "")


# targets -------------------------------------------------------------------------------------


def test_a_target_parses_from_its_setting_text() -> None:
    plain = WebhookTarget.parse("https://hooks.example.com/in/abc123")
    assert plain == WebhookTarget("https://hooks.example.com/in/abc123", None)
    limited = WebhookTarget.parse("http://127.0.0.1:9000/hook SessionReady, SessionTerminated")
    assert limited.types == frozenset({"SessionReady", "SessionTerminated"})
    assert limited.wants("SessionReady")
    assert not limited.wants("SessionCreated")


@pytest.mark.parametrize(
    "spec",
    ["ftp://example.com/hook", "/relative/hook", "http://127.0.0.1/hook SessionCreatd"],
)
def test_a_bad_target_is_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        WebhookTarget.parse(spec)


def test_a_target_is_logged_without_its_path_or_credentials() -> None:
    target = WebhookTarget("https://user:pw@hooks.example.com:8443/services/T0/B0/XyZsecret?k=v")
    assert target.origin == "https://hooks.example.com:8443"
    assert "XyZsecret" not in repr(target)
    assert "pw" not in repr(target)


# signatures ----------------------------------------------------------------------------------


def test_verify_signature_accepts_the_real_one_and_nothing_else() -> None:
    body = b'{"id":1,"type":"SessionReady"}'
    now = int(time.time())
    headers = sign_headers(SECRET, body, msg_id="1", timestamp=now)
    assert headers[ID_HEADER] == "1" and headers[TIMESTAMP_HEADER] == str(now)
    version, _, signature = headers[SIGNATURE_HEADER].partition(",")
    assert version == "v1" and len(base64.b64decode(signature)) == 32  # HMAC-SHA256

    assert verify_signature(SECRET, headers, body)
    assert not verify_signature(SECRET, headers, body + b" ")
    assert not verify_signature(as_whsec(b"another key of 32 bytes, at last"), headers, body)
    assert not verify_signature(SECRET, {**headers, ID_HEADER: "2"}, body)
    assert not verify_signature(SECRET, {**headers, TIMESTAMP_HEADER: str(now + 1)}, body)
    old = sign_headers(SECRET, body, msg_id="1", timestamp=now - 301)
    assert not verify_signature(SECRET, old, body)  # more than 5 minutes old
    unsigned = {ID_HEADER: "1", TIMESTAMP_HEADER: str(now)}
    assert not verify_signature(SECRET, unsigned, body)
    assert not verify_signature(SECRET, {**headers, SIGNATURE_HEADER: "v1,not-base64!"}, body)
    # Several signatures (say, during a rotation): one that verifies is enough.
    other = sign_headers(as_whsec(b"x" * 32), body, msg_id="1", timestamp=now)
    both = {**headers, SIGNATURE_HEADER: f"{other[SIGNATURE_HEADER]} {headers[SIGNATURE_HEADER]}"}
    assert verify_signature(SECRET, both, body)


def test_a_plain_webhook_secret_is_its_utf8_bytes_and_receivers_get_its_whsec_form() -> None:
    body = b'{"id":7}'
    headers = sign_headers("plain-text-secret", body)
    assert (
        as_whsec("plain-text-secret") == "whsec_" + base64.b64encode(b"plain-text-secret").decode()
    )
    assert documented_verify(as_whsec("plain-text-secret"), headers, body)
    assert verify_signature("plain-text-secret", headers, body)


class WorkerKiller(BaseException):
    """Gets past every `except Exception`: the worker task itself dies."""


async def test_a_worker_that_dies_is_replaced_and_its_event_still_delivered(
    receiver: Receiver, make_webhooks: Callable[..., Awaitable[OutboundWebhooks]]
) -> None:
    webhooks = await make_webhooks(WebhookTarget(receiver.url), policy=replace(FAST, concurrency=1))
    real = webhooks._deliver_head
    failures = [WorkerKiller(), RuntimeError("bookkeeping bug")]

    async def failing_first(*args: object) -> None:
        if failures:
            raise failures.pop(0)
        await real(*args)  # type: ignore[arg-type]

    webhooks._deliver_head = failing_first  # type: ignore[method-assign]
    log = EventLog(100, first_id=1)
    log.add_listener(webhooks.offer)
    first = log.append(T.SESSION_CREATED, session_id="a", data={})
    second = log.append(T.SESSION_READY, session_id="a", data={})

    # The first event's worker died outright, and the lane then hit a bug once: both events
    # still arrive, in order, exactly once each.
    await eventually(lambda: len(receiver.accepted) == 2)
    assert [d.event_id for d in receiver.accepted] == [first.id, second.id]
    assert len(webhooks._workers) == 1
