"""Session Manager: the control plane of a LiveKit-based voice / robot AI backend."""

__version__ = "0.1.0"

# Before any module of ours makes its logger: every logging call of the manager is one that
# cannot raise (see logs.SafeLogger).
from session_manager import logs as _logs  # noqa: F401
