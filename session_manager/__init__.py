"""Session Manager: the control plane of a LiveKit-based voice / robot AI backend."""

__version__ = "0.1.0"
