"""Where sessions and registrations outlive a request: embedded SQLite by default, or memory, or
Redis (`store.redis_store`, left out here so that importing the others loads no Redis client)."""

from session_manager.store.base import Store
from session_manager.store.memory import MemoryStore
from session_manager.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "SqliteStore", "Store"]
