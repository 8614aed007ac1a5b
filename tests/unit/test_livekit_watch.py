"""LiveKitWatch: when LiveKit counts as down or back, and what the board and supervisor are told.

LiveKit is stood in for by a prober the test switches between answering and failing; the real
probe against a real livekit-server is in tests/integration/test_livekit_faults.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from session_manager.errors import LiveKitUnavailable
from session_manager.health_board import LIVEKIT, HealthBoard
from session_manager.livekit.gateway import LiveKitGateway, make_endpoint
from session_manager.livekit.watch import FAILED_PROBES_FOR_DOWN, LiveKitWatch
from tests.conftest import free_port

INTERVAL = 0.01


class FakeLiveKit:
    """Answers while `up`; a probe can be held at `gate` to finish later."""

    def __init__(self) -> None:
        self.up = True
        self.crash: Exception | None = None
        self.probes = 0
        self.failed = 0
        self.gate: asyncio.Event | None = None
        self.held = asyncio.Event()  # a probe is waiting at the gate

    async def probe(self) -> None:
        self.probes += 1
        if self.gate is not None:
            self.held.set()
            await asyncio.wait_for(self.gate.wait(), 5)
        if self.crash is not None:
            raise self.crash
        if not self.up:
            self.failed += 1
            raise LiveKitUnavailable("LiveKit at http://127.0.0.1:1/ unreachable: refused")


@dataclass
class FakeManaged:
    running: bool = True
    listeners: list[Callable[[int], None]] = field(default_factory=list)

    def add_exit_listener(self, listener: Callable[[int], None]) -> None:
        self.listeners.append(listener)

    def exit(self, code: int) -> None:
        self.running = False
        for listener in self.listeners:
            listener(code)


@dataclass
class Told:
    lost: list[tuple[str, bool]] = field(default_factory=list)
    back: int = 0


@dataclass
class Watched:
    watch: LiveKitWatch
    livekit: FakeLiveKit
    board: HealthBoard
    told: Told


WatchFactory = Callable[..., Watched]


@pytest.fixture
async def make_watch() -> AsyncIterator[WatchFactory]:
    watches: list[LiveKitWatch] = []

    def make(managed: FakeManaged | None = None) -> Watched:
        livekit, board, told = FakeLiveKit(), HealthBoard(), Told()

        def back() -> None:
            told.back += 1

        watch = LiveKitWatch(
            livekit,
            board=board,
            on_lost=lambda reason, rooms_lost: told.lost.append((reason, rooms_lost)),
            on_back=back,
            interval=INTERVAL,
            managed=managed,
        )
        watches.append(watch)
        watch.start()
        return Watched(watch, livekit, board, told)

    try:
        yield make
    finally:
        for watch in watches:
            await watch.aclose()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def test_an_unreachable_livekit_is_down_after_two_failed_probes_and_told_once(
    make_watch: WatchFactory,
) -> None:
    assert FAILED_PROBES_FOR_DOWN == 2
    w = make_watch()
    await until(lambda: w.livekit.probes >= 2)
    assert w.board.healthy and w.told.lost == []

    w.livekit.up = False
    await until(lambda: w.livekit.failed >= 6)
    assert w.told.lost == [("LiveKit at http://127.0.0.1:1/ unreachable: refused", False)]
    problem = w.board.problem(LIVEKIT)
    assert problem is not None and "unreachable" in problem.reason
    assert w.watch.down

    w.livekit.up = True
    await until(lambda: not w.board.is_down(LIVEKIT))
    probes = w.livekit.probes
    await until(lambda: w.livekit.probes >= probes + 3)
    assert w.told.back == 1
    assert len(w.told.lost) == 1


async def test_a_single_failed_probe_is_not_an_outage(make_watch: WatchFactory) -> None:
    w = make_watch()
    first = hold_next_probe(w.livekit)
    await until(w.livekit.held.is_set)
    w.livekit.up = False  # the held probe fails...
    second = hold_next_probe(w.livekit)
    first.set()
    await until(w.livekit.held.is_set)
    assert w.livekit.failed == 1
    w.livekit.up = True  # ...and the next one answers
    w.livekit.gate = None
    second.set()
    probes = w.livekit.probes
    await until(lambda: w.livekit.probes >= probes + 3)
    assert w.livekit.failed == 1
    assert w.board.healthy
    assert w.told.lost == [] and w.told.back == 0


def hold_next_probe(livekit: FakeLiveKit) -> asyncio.Event:
    """The next probe waits until the returned event is set (one already held keeps its own)."""
    livekit.held.clear()
    livekit.gate = asyncio.Event()
    return livekit.gate


async def test_a_managed_exit_is_down_at_once_with_the_rooms_lost(
    make_watch: WatchFactory,
) -> None:
    managed = FakeManaged()
    w = make_watch(managed)
    # A probe in flight when the process exits may have been answered by the dead process:
    # it must not end the outage.
    in_flight = hold_next_probe(w.livekit)
    await until(w.livekit.held.is_set)
    managed.exit(-9)
    reason = "managed livekit-server exited with code -9; restarting"
    assert w.told.lost == [(reason, True)]
    problem = w.board.problem(LIVEKIT)
    assert problem is not None and problem.reason == reason
    after = hold_next_probe(w.livekit)
    in_flight.set()  # it answers...
    await until(w.livekit.held.is_set)  # ...and the loop has moved on to the next probe
    assert w.board.is_down(LIVEKIT) and w.told.back == 0
    w.livekit.gate = None
    after.set()  # a probe started after the exit answers: the outage is over
    await until(lambda: w.told.back == 1)
    assert w.board.healthy
    assert w.told.lost == [(reason, True)]


async def test_an_outage_that_turns_out_to_lose_the_rooms_is_told_again(
    make_watch: WatchFactory,
) -> None:
    managed = FakeManaged()
    w = make_watch(managed)
    w.livekit.up = False
    await until(lambda: len(w.told.lost) == 1)
    assert w.told.lost[0][1] is False
    managed.exit(1)
    managed.exit(1)  # dying again in the same outage says nothing new
    assert [rooms_lost for _, rooms_lost in w.told.lost] == [False, True]
    problem = w.board.problem(LIVEKIT)
    assert problem is not None and "exited with code 1" in problem.reason
    w.livekit.up = True
    await until(lambda: w.told.back == 1)


async def test_a_managed_process_already_gone_at_start_is_down(make_watch: WatchFactory) -> None:
    w = make_watch(FakeManaged(running=False))
    assert w.told.lost == [("managed livekit-server is not running; restarting", True)]
    await until(lambda: w.told.back == 1)  # the prober answers: it was restarted


async def test_a_loop_that_dies_is_started_again(make_watch: WatchFactory) -> None:
    w = make_watch()
    w.livekit.crash = RuntimeError("a bug in the probe")
    probes = w.livekit.probes
    await until(lambda: w.livekit.probes >= probes + 3)  # it keeps probing
    w.livekit.crash = None
    w.livekit.up = False
    await until(lambda: w.board.is_down(LIVEKIT))
    w.livekit.up = True
    await until(lambda: w.board.healthy and w.told.back == 1)


async def test_nothing_is_told_after_close(make_watch: WatchFactory) -> None:
    managed = FakeManaged()
    w = make_watch(managed)
    await w.watch.aclose()
    managed.exit(-9)
    assert w.told.lost == [] and w.board.healthy


@pytest.mark.parametrize(("status", "body"), [(200, "OK"), (503, "OK"), (200, "something else")])
async def test_the_gateway_probe_wants_200_ok(status: int, body: str) -> None:
    async def root(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body)

    app = web.Application()
    app.router.add_get("/", root)
    async with TestServer(app, host="127.0.0.1") as server:
        url = f"ws://127.0.0.1:{server.port}"
        gateway = LiveKitGateway(make_endpoint(url, "key", "secret", None), timeout=2.0)
        await gateway.start()
        try:
            if (status, body) == (200, "OK"):
                await gateway.probe()
            else:
                with pytest.raises(LiveKitUnavailable, match=r"^LiveKit unreachable: ") as down:
                    await gateway.probe()
                assert str(server.port) not in down.value.message
        finally:
            await gateway.aclose()


async def test_the_gateway_probe_of_a_closed_port_is_unavailable() -> None:
    port = free_port()
    gateway = LiveKitGateway(make_endpoint(f"ws://127.0.0.1:{port}", "k", "s", None), timeout=2.0)
    await gateway.start()
    try:
        with pytest.raises(LiveKitUnavailable, match=r"^LiveKit unreachable: connection") as down:
            await gateway.probe()
        assert str(port) not in down.value.message
    finally:
        await gateway.aclose()
