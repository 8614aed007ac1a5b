"""What a join-room tells a service about its session (issue 11, part 2), and the token and room
that go with it: driven through the supervisor with in-memory LiveKit and microservices. The
same against the real livekit-server and a real service: tests/e2e/test_session_context.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson
from livekit.api import TokenVerifier

from session_manager.dispatch import JoinRoomRequest, service_metadata
from session_manager.livekit.tokens import KIND_AGENT, TokenMinter
from session_manager.livekit.webhooks import ROLE_ATTRIBUTE, ROLE_CLIENT, ROLE_SERVICE
from session_manager.session.deps import ROOM_CLOSE_MARGIN
from tests.unit.conftest import HarnessFactory
from tests.unit.session_harness import FakeGateway, Harness, S

OLD_FIELDS = ["session_id", "room_name", "service_identity", "access_token", "livekit_url"]
NEW_FIELDS = ["session_metadata", "user_identity", "user_name"]

METADATA: dict[str, Any] = {
    "language": "zh-CN",
    "robot": {"id": "r2-d2", "api_token": "robot-secret", "arms": [{"password": "x", "n": 2}]},
    "duration_limit": 600,
    "Authorization": "Bearer user-secret",
    "client_secret": "s3cr3t",
}
# What a service is given of it: every key naming a credential left out, at any depth.
METADATA_FOR_SERVICES = {
    "language": "zh-CN",
    "robot": {"id": "r2-d2", "arms": [{"n": 2}]},
    "duration_limit": 600,
}


@dataclass
class RecordingGateway(FakeGateway):
    """FakeGateway that keeps what each token and each room was asked for."""

    tokens: list[dict[str, Any]] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)

    def mint_token(self, *, identity: str, room_name: str, ttl: timedelta, **more: Any) -> str:
        self.tokens.append({"identity": identity, **more})
        return super().mint_token(identity=identity, room_name=room_name, ttl=ttl)

    async def create_room(
        self, name: str, *, metadata: str, empty_timeout: int, departure_timeout: int = 0
    ) -> None:
        self.created.append(
            {"name": name, "empty_timeout": empty_timeout, "departure_timeout": departure_timeout}
        )
        await super().create_room(name, metadata=metadata, empty_timeout=empty_timeout)


async def test_a_service_is_told_whose_session_it_is_and_what_it_is_for(
    harness: Harness,
) -> None:
    harness.registry.register("asr", "http://asr", {"type": "ASR"})
    created = await harness.create(
        user_identity="user123",
        user_name="张三",
        metadata=METADATA,
        required_services=["asr"],
    )

    [request] = harness.microservices.requests
    assert request.session_metadata == METADATA_FOR_SERVICES
    assert (request.user_identity, request.user_name) == ("user123", "张三")
    body = orjson.loads(request.body())
    # The five fields of the earlier implementation, as they were, then the added ones.
    assert list(body) == OLD_FIELDS + NEW_FIELDS
    assert body["session_id"] == created.session_id
    assert body["room_name"] == created.room_name
    assert body["service_identity"] == "asr"
    assert body["access_token"] == request.access_token
    assert body["livekit_url"] == "ws://lk"
    assert body["session_metadata"] == METADATA_FOR_SERVICES
    assert (body["user_identity"], body["user_name"]) == ("user123", "张三")
    for secret in ("robot-secret", "user-secret", "s3cr3t"):
        assert secret.encode() not in request.body()
    # The session itself keeps its metadata as the user gave it.
    assert (await harness.view(created.session_id))["metadata"] == METADATA


async def test_a_session_without_metadata_or_name_sends_an_empty_object_and_null(
    harness: Harness,
) -> None:
    harness.registry.register("asr", "http://asr", {})
    await harness.create(user_identity="user456", required_services=["asr"])

    body = orjson.loads(harness.microservices.requests[0].body())
    assert body["session_metadata"] == {}
    assert body["user_identity"] == "user456"
    assert body["user_name"] is None


async def test_a_service_dispatched_again_is_told_the_same(harness: Harness) -> None:
    harness.registry.register("asr", "http://asr", {})
    created = await harness.create(
        user_identity="user123", metadata={"language": "en"}, required_services=["asr"]
    )
    harness.joined(created, "asr")
    await harness.until(created.session_id, S.READY)
    harness.left(created, "asr")  # left on its own: dispatched again
    await harness.eventually(lambda: len(harness.microservices.requests) == 2, "a second join-room")

    first, again = harness.microservices.requests
    assert again.session_metadata == first.session_metadata == {"language": "en"}
    assert again.user_identity == "user123"


def test_service_metadata_leaves_metadata_without_credentials_as_it_is() -> None:
    plain = {"language": "en", "robot": {"id": 7}}
    assert service_metadata(plain) is plain
    assert service_metadata(METADATA) == METADATA_FOR_SERVICES
    assert "api_token" in METADATA["robot"]  # the session's own copy is not changed


async def test_service_tokens_are_livekit_agents_and_the_users_is_not(
    make_harness: HarnessFactory,
) -> None:
    gateway = RecordingGateway()
    harness = await make_harness(gateway=gateway)
    harness.registry.register("asr", "http://asr", {})
    await harness.create(user_identity="user123", required_services=["asr"])

    by_identity = {token["identity"]: token for token in gateway.tokens}
    assert by_identity["asr"]["kind"] == KIND_AGENT == "agent"
    assert by_identity["asr"]["attributes"][ROLE_ATTRIBUTE] == ROLE_SERVICE
    assert by_identity["user123"].get("kind") is None
    assert by_identity["user123"]["attributes"][ROLE_ATTRIBUTE] == ROLE_CLIENT


def test_the_kind_is_in_the_signed_token_as_livekit_reads_it() -> None:
    minter = TokenMinter("api-key", "api-secret-of-at-least-32-characters")
    service = minter.participant(
        identity="asr",
        room_name="room-1",
        ttl=timedelta(minutes=5),
        attributes={ROLE_ATTRIBUTE: ROLE_SERVICE},
        kind=KIND_AGENT,
    )
    user = minter.participant(identity="user123", room_name="room-1", ttl=timedelta(minutes=5))

    verifier = TokenVerifier("api-key", "api-secret-of-at-least-32-characters")
    claims = verifier.verify(service)
    assert claims.kind == "agent"
    assert claims.identity == "asr"
    assert claims.attributes == {ROLE_ATTRIBUTE: ROLE_SERVICE}
    assert claims.video is not None and claims.video.room == "room-1"
    assert verifier.verify(user).kind == ""  # a standard participant


async def test_the_room_outlasts_the_managers_own_deadlines_for_the_user(
    make_harness: HarnessFactory,
) -> None:
    """LiveKit counts a room where only agents are as empty: it must keep it past the
    deadlines that let the manager end the session with its own reason."""
    gateway = RecordingGateway()
    harness = await make_harness(
        gateway=gateway,
        room_empty_timeout=20,
        client_join_timeout=45.5,
        client_reconnect_grace=60.0,
    )
    await harness.create(required_services=[])
    harness_long_empty = await make_harness(
        gateway=(long_gateway := RecordingGateway()),
        room_empty_timeout=900,
        client_join_timeout=10.0,
        client_reconnect_grace=5.0,
    )
    await harness_long_empty.create(required_services=[])

    [room] = gateway.created
    assert room["empty_timeout"] == 46 + ROOM_CLOSE_MARGIN
    assert room["departure_timeout"] == 60 + ROOM_CLOSE_MARGIN
    [long_room] = long_gateway.created
    assert long_room["empty_timeout"] == 900  # an operator's longer one is kept
    assert long_room["departure_timeout"] == 5 + ROOM_CLOSE_MARGIN


def test_old_positional_construction_still_makes_a_request() -> None:
    request = JoinRoomRequest("sid", "room-sid", "asr-1", "token", "ws://lk")
    assert list(orjson.loads(request.body())) == OLD_FIELDS + NEW_FIELDS
