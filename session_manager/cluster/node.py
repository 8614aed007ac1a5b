"""This process as one node of a cluster of managers sharing a Redis (store = "redis").

The node owns its keeper loop: every fifth of `lease_ttl` it renews the leases of the sessions
this process owns (those another process took are given up at once), and claims the sessions
whose owner is gone — their leases ran out, or the owner let them go at shutdown — and has them
adopted here, with the same takeover a restarted single process uses. It also carries commands
and webhooks between processes (the bus), and says whether a webhook was already acted on by
another process (LiveKit may post each one to every instance).

If the keeper loop dies it is restarted by `Periodic`; Redis being down shows as StoreUnavailable
from each call and on the health board through the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from session_manager.cluster.bus import ClusterBus, SessionCommand
from session_manager.cluster.leases import SessionLeases
from session_manager.errors import ManagerError
from session_manager.health_board import CLUSTER, HealthBoard
from session_manager.livekit.webhooks import RoomEvent
from session_manager.periodic import Periodic
from session_manager.session.record import JsonDict
from session_manager.session.states import SessionStatus
from session_manager.store.base import Store
from session_manager.takeover import Adoption, SessionTakeOver

log = logging.getLogger(__name__)

WEBHOOK_MEMORY = 600  # seconds a webhook id is remembered across the cluster


class ClusterNode:
    def __init__(
        self,
        redis: Redis,
        store: Store,
        takeover: SessionTakeOver,
        *,
        prefix: str,
        node_id: str,
        lease_ttl: float,
        timeout: float,
        board: HealthBoard | None = None,
        on_fatal: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._board = board or HealthBoard()
        self._redis = redis
        self._store = store
        self._takeover = takeover
        self._prefix = prefix
        self.node_id = node_id
        self.lease_ttl = lease_ttl
        self._timeout = timeout
        self.leases = SessionLeases(
            redis, prefix=prefix, node_id=node_id, ttl=lease_ttl, timeout=timeout
        )
        self.bus = ClusterBus(
            redis,
            prefix=prefix,
            node_id=node_id,
            timeout=timeout,
            resend_every=lease_ttl,
            give_up_after=3 * lease_ttl + 2 * timeout,
            on_fatal=on_fatal,
        )
        self._keeper = Periodic("cluster-keeper", self._keep, interval=lease_ttl / 5, jitter=0.1)
        self.leads_health_checks = False  # this process makes the cluster's health checks
        self.on_lost: Callable[[list[str]], None] = lambda session_ids: None
        self.on_orphans: Callable[[list[Adoption]], None] = lambda adoptions: None
        # The instances whose load across the cluster is read each round, and who hears it.
        self.service_ids: Callable[[], list[str]] = list
        self.on_loads: Callable[[dict[str, int]], None] = lambda loads: None

    async def start(self) -> list[Adoption]:
        """Listen on the bus and claim the sessions nobody owns (those a previous process left,
        or this one's before a restart); returns them, to be adopted before serving."""
        await self.bus.start(self._timeout * 2)
        await self._lead_health_checks()
        adopted = await self._claim_orphans(at_once=True)
        self._keeper.start()
        return adopted

    async def aclose(self) -> None:
        await self._keeper.aclose()
        await self.bus.aclose()

    async def hand_over(self) -> None:
        """Shutdown keeping the sessions: let every lease go so other processes adopt them at
        once (the views were written first)."""
        try:
            await self.leases.release_all()
        except ManagerError as exc:
            log.warning("leases not released; they run out instead", extra={"error": exc.message})

    # what the supervisor asks ----------------------------------------------------------------

    async def claim_new(
        self, session_id: str, places: dict[str, int | None], max_live: int | None
    ) -> None:
        await self.leases.claim_new(session_id, places, max_live=max_live)

    async def session_ended(self, session_id: str, services: list[str]) -> None:
        await self.leases.release(session_id, ended=True, services=services)

    async def first_sight(self, webhook_id: str) -> bool:
        """Whether no process of the cluster has taken this webhook yet (and now this one has).
        With Redis down every process acts on it: a duplicate beats a loss."""
        try:
            async with asyncio.timeout(self._timeout):
                taken = await self._redis.set(
                    f"{self._prefix}webhook:{webhook_id}", self.node_id, nx=True, ex=WEBHOOK_MEMORY
                )
        except (RedisError, OSError, TimeoutError):
            return True
        return bool(taken)

    async def share_webhook(self, event: RoomEvent) -> None:
        await self.bus.share_webhook(event)

    async def ask_owner(self, command: SessionCommand) -> JsonDict:
        return await self.bus.ask_owner(command)

    async def live_anywhere(self, session_ids: set[str]) -> set[str]:
        return await self.leases.known(session_ids)

    # the keeper loop -------------------------------------------------------------------------

    async def _keep(self) -> None:
        await self._lead_health_checks()
        try:
            lost = await self.leases.renew()
        except ManagerError as exc:
            # New sessions are refused meanwhile (they could not be owned); the running ones
            # go on here, and their leases are taken again when Redis answers.
            self._board.down(CLUSTER, f"leases cannot be renewed: {exc.message}")
            return
        self._board.up(CLUSTER)
        try:
            self.on_loads(await self.leases.loads(self.service_ids()))
        except ManagerError as exc:
            log.warning("instance loads not read", extra={"error": exc.message})
        if lost:
            log.warning("sessions taken over by another process", extra={"count": len(lost)})
            self.on_lost(lost)
        try:
            adopted = await self._claim_orphans()
        except ManagerError as exc:
            log.warning("sessions without an owner not claimed", extra={"error": exc.message})
            return
        if adopted:
            self.on_orphans(adopted)

    async def _lead_health_checks(self) -> None:
        """One process leads the health checks: it holds a lease it renews; when it dies,
        another takes the lease within `lease_ttl`."""
        key, ttl_ms = f"{self._prefix}leader:health", max(1, int(self.lease_ttl * 1000))
        try:
            async with asyncio.timeout(self._timeout):
                if await self._redis.set(key, self.node_id, nx=True, px=ttl_ms):
                    leads = True
                else:
                    holder = await self._redis.get(key)
                    leads = holder in (self.node_id, self.node_id.encode())
                    if leads:
                        await self._redis.pexpire(key, ttl_ms)
        except (RedisError, OSError, TimeoutError):
            leads = False  # nobody can tell; the checks resume with Redis
        if leads != self.leads_health_checks:
            log.info("health checks led here" if leads else "health checks led elsewhere")
        self.leads_health_checks = leads

    async def _claim_orphans(self, *, at_once: bool = False) -> list[Adoption]:
        claimed = await self.leases.claim_orphans(at_once=at_once)
        if not claimed:
            return []
        views: list[JsonDict] = []
        for session_id in claimed:
            view = await self._store.get_session(session_id)
            if view is None or view["status"] == SessionStatus.TERMINATED.value:
                await self.leases.forget(session_id)
            else:
                views.append(view)
        outcome = await self._takeover.take_over(views)
        for session_id in {view["session_id"] for view in views} - {
            adoption.record.session_id for adoption in outcome.adopted
        }:
            await self.leases.forget(session_id)  # ended by the takeover
        log.info(
            "sessions without an owner taken over",
            extra={"adopted": len(outcome.adopted), "ended": outcome.ended},
        )
        return outcome.adopted
