"""Console logging for microservices: the SDK logs fixed messages with values in `extra`, and a
plain formatter would drop those values, so this one appends them as key=value pairs."""

from __future__ import annotations

import logging
import sys

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime"}


class ExtraFieldsFormatter(logging.Formatter):
    # aiohttp's access log already puts every value in its message and repeats them as extras.
    quiet_loggers: tuple[str, ...] = ("aiohttp.access",)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        if record.name.startswith(self.quiet_loggers):
            return line
        extras = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
        }
        if not extras:
            return line
        return line + " " + " ".join(f"{key}={value!r}" for key, value in sorted(extras.items()))


def configure_logging(level: int | str = logging.INFO) -> None:
    """Log to stderr with timestamps and `extra` fields; replaces the root logger's handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ExtraFieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
