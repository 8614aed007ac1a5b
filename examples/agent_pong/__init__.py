"""A livekit-agents worker that answers b"ping" with b"pong" (see README.md)."""
