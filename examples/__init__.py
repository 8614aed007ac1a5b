"""Example microservices written with session_manager.sdk."""
