"""Warm pools end to end: the real `session-manager` (with its managed livekit-server), real pong
processes in pooled rooms, and a real LiveKit client pinging the room it was handed.

Needs the private network namespace of scripts/test.sh: WebRTC ignores loopback candidates.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import orjson
import pytest

from tests.e2e.failover_harness import Api, JsonDict, Stack, poll, require_netns, running_manager
from tests.e2e.test_failover import PONG_TIMEOUT, pinging, pong_from
from tests.e2e.test_ping_pong import connected_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

POOL = "type:PONG"
FILL_TIMEOUT = 30.0  # a pool's members Ready: rooms created, pongs joined
SETTINGS: dict[str, float | int | str] = {
    "health_interval": 1,
    "health_timeout": 1,
    "unhealthy_after": 2,
    "dispatch_attempts": 2,
    "dispatch_timeout": 2,
    "dispatch_backoff": 0.1,
    "join_timeout": 20,
    "log_level": "DEBUG",  # for the log tails printed when a test fails
}


def pools_setting(size: int, max_idle: float) -> str:
    return orjson.dumps([{"services": [POOL], "size": size, "max_idle": max_idle}]).decode()


async def pool(api: Api) -> JsonDict:
    answer = await api.ok("GET", "/api/v1/pools")
    found: JsonDict = next(p for p in answer["pools"] if p["name"] == POOL)
    return found


async def until_ready(api: Api, count: int, what: str) -> JsonDict:
    return await poll(lambda: pool(api), lambda p: p["ready"] >= count, FILL_TIMEOUT, what)


async def pool_metric(api: Api, name: str) -> float:
    async with api.http.get(api.base_url + "/metrics") as response:
        text = await response.text()
    pattern = rf'^session_manager_pool_{name}{{pool="{re.escape(POOL)}"}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    assert found is not None, f"no session_manager_pool_{name} for {POOL} in /metrics"
    return float(found.group(1))


async def create(api: Api, user: str) -> tuple[JsonDict, float]:
    """A create-session that does not ask to wait; its answer and how long it took."""
    started = time.perf_counter()
    body = {"user_identity": user, "required_services": [POOL], "metadata": {"topic": user}}
    answer = await api.ok("POST", "/api/v1/create-session", body)
    return answer, (time.perf_counter() - started) * 1000


async def pong_is_answering(stack: Stack, created: JsonDict) -> str:
    """Connect as the user, ping, and wait for a pong from the session's service; its id."""
    view = await stack.api.session(created["session_id"])
    (slot,) = view["services"]
    async with connected_client(created["livekit_url"], created["access_token"]) as client:
        async with pinging(client):
            await pong_from(client, slot["service_id"], PONG_TIMEOUT)
    return str(slot["service_id"])


async def test_a_hit_is_ready_at_once_and_a_miss_is_dispatched(tmp_path: Path) -> None:
    require_netns()
    settings = {**SETTINGS, "warm_pools": pools_setting(2, 600)}
    async with running_manager(tmp_path, **settings) as stack:
        api = stack.api
        await stack.start_pong("pong-a")
        await stack.start_pong("pong-b")
        await until_ready(api, 2, "both members Ready")
        hits, misses = await pool_metric(api, "hits_total"), await pool_metric(api, "misses_total")
        assert await pool_metric(api, "ready") == 2

        # A hit: Ready in the answer, without waiting, in a room its service is already in.
        created, took_ms = await create(api, "pool-user")
        print(f"pool hit: create -> Ready in {took_ms:.1f} ms")
        assert created["status"] == "Ready", created
        view = await api.session(created["session_id"])
        assert view["pool"] == POOL and view["user_identity"] == "pool-user", view
        assert view["services"][0]["state"] == "joined", view
        assert await pool_metric(api, "hits_total") == hits + 1
        service_id = await pong_is_answering(stack, created)
        await api.wait_for_status(created["session_id"], "Active", 10)
        # the service was told whose session it now is (session-started)
        log = stack.pongs[service_id].child.log_text()
        assert any(
            "pong session started" in line and created["session_id"] in line and "pool-user" in line
            for line in log.splitlines()
        ), "pong never logged the session's start"
        # the pool refills behind it
        await until_ready(api, 2, "the pool refilled")

        # Three creates at once: two hits, then the pool is empty and the third is a miss,
        # dispatched as usual, Ready once its service joins, and answering pings too.
        answers = [await create(api, f"burst-{n}") for n in range(3)]
        statuses = [answer["status"] for answer, _ in answers]
        assert statuses[:2] == ["Ready", "Ready"], statuses
        missed = answers[2][0]
        # (answered once its join-room call is: Ready already, if LiveKit was quick to say so)
        assert await pool_metric(api, "misses_total") == misses + 1
        assert await pool_metric(api, "hits_total") == hits + 3
        await api.wait_for_status(missed["session_id"], "Ready", 20)
        assert (await api.session(missed["session_id"]))["pool"] is None
        await pong_is_answering(stack, missed)

        # members are no user's sessions: the listing has the four users' sessions only
        listing = await api.ok("GET", "/api/v1/sessions?limit=100")
        users = sorted(s["user_identity"] for s in listing["sessions"])
        assert users == ["burst-0", "burst-1", "burst-2", "pool-user"], users


async def test_members_expire_and_refill_and_a_dead_ones_is_never_handed_out(
    tmp_path: Path,
) -> None:
    require_netns()
    settings = {**SETTINGS, "warm_pools": pools_setting(2, 4)}
    async with running_manager(tmp_path, **settings) as stack:
        api = stack.api
        await stack.start_pong("pong-a")
        await stack.start_pong("pong-b")
        first = await until_ready(api, 2, "both members Ready")
        first_ids = {m["session_id"] for m in first["members"]}

        # Expiry and refill keep the pool at its size: after max_idle, new members.
        def renewed(p: JsonDict) -> bool:
            ids = {m["session_id"] for m in p["members"]}
            return p["ready"] == 2 and not ids & first_ids

        later = await poll(lambda: pool(api), renewed, FILL_TIMEOUT, "members replaced")
        assert later["expiries"] >= 2 and len(later["members"]) == 2, later
        assert await pool_metric(api, "expiries_total") >= 2

        # A member whose service is killed is never handed out.
        stack.pongs["pong-b"].child.process.kill()
        await poll(
            lambda: api.microservice("pong-b"),
            lambda s: s["status"] == "Unhealthy",
            20,
            "pong-b Unhealthy",
        )
        for n in range(3):
            created, _ = await create(api, f"after-kill-{n}")
            view = await api.session(created["session_id"])
            assert view["services"][0]["service_id"] == "pong-a", view
            if created["status"] != "Ready":
                await api.wait_for_status(created["session_id"], "Ready", 20)
            assert await pong_is_answering(stack, created) == "pong-a"
        current = await until_ready(api, 2, "the pool refilled with pong-a")
        for member in current["members"]:
            assert member["service_ids"] == ["pong-a"], current
