"""Pong: answers every b"ping" data packet with b"pong", to the sender only."""

from examples.pong.pong import PongHandler, main

__all__ = ["PongHandler", "main"]
