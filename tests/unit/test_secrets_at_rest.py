"""Secrets at rest: no client token in the idempotency record, a database only its owner can
read, and no LiveKit config (it holds the API secret) left behind by a killed manager."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from session_manager.livekit.server import WORKDIR_PREFIX, remove_stale_workdirs
from session_manager.store import SqliteStore
from tests.unit.session_harness import Harness


async def test_the_idempotency_record_keeps_no_client_token(harness: Harness) -> None:
    created = await harness.create(idempotency_key="k1", body_hash="h1", required_services=[])
    store = harness.supervisor._store
    async with asyncio.timeout(5):
        while (stored := await store.get_idempotency("k1")) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    assert "access_token" not in stored["response"]
    assert created.access_token not in repr(stored)

    # A replay once the record is stored: the same session, a token minted for it again.
    while harness.supervisor._idempotent.pending:  # noqa: ASYNC110 (the record is written)
        await asyncio.sleep(0.005)
    replay = await harness.create(idempotency_key="k1", body_hash="h1", required_services=[])
    assert (replay.session_id, replay.room_name) == (created.session_id, created.room_name)
    assert replay.access_token.startswith(f"token:user123:{created.room_name}:")


async def test_the_database_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state" / "db.sqlite3")
    await store.open()
    try:
        mode = stat.S_IMODE(os.stat(tmp_path / "state" / "db.sqlite3").st_mode)
    finally:
        await store.aclose()
    assert mode == 0o600


def test_livekit_config_of_a_killed_manager_is_removed(tmp_path: Path) -> None:
    dead_pid = 2**22 + 17  # above the largest pid Linux hands out: no such process
    stale = tmp_path / f"{WORKDIR_PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{WORKDIR_PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "livekit.yaml").write_text("keys:\n  k: secret\n")

    removed = remove_stale_workdirs(tmp_path)

    assert removed == [stale]
    assert not stale.exists() and live.exists()
