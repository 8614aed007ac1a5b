"""The microservice registry: who can be dispatched into a session, and where to reach them."""

from session_manager.registry.registry import Registry, ServiceRecord

__all__ = ["Registry", "ServiceRecord"]
