"""The LiveKit gateway: rooms and tokens, webhook verification, the managed livekit-server."""
