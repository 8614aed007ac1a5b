"""Logging from ERROR to TRACE; fixed message text with the values as key=value pairs after it.

Values travel in `extra={...}` so a line reads the same for every session and can be grepped.
Any extra whose name says token or secret is replaced by a placeholder: a last line of defence,
the code never passes one on purpose.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

TRACE = 5
logging.addLevelName(TRACE, "TRACE")
logging.addLevelName(logging.WARNING, "WARN")

LEVELS = {
    "ERROR": logging.ERROR,
    "WARN": logging.WARNING,
    "INFO": logging.INFO,
    "DEBUG": logging.DEBUG,
    "TRACE": TRACE,
}

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SENSITIVE_MARKERS = ("token", "secret", "password", "authorization")


class SafeLogger(logging.Logger):
    """A logger whose calls cannot raise over their `extra`: a key that clashes with a
    LogRecord attribute (`message`, `name`, ...) makes the standard logger raise KeyError, in
    the middle of whatever error path was logging. Here it is kept as `extra_<key>` instead.
    (ruff's G101 catches the literal cases; this catches the rest.)"""

    def makeRecord(
        self,
        name: str,
        level: int,
        fn: str,
        lno: int,
        msg: object,
        args: Any,
        exc_info: Any,
        func: str | None = None,
        extra: Any = None,
        sinfo: str | None = None,
    ) -> logging.LogRecord:
        if extra:
            extra = {
                (f"extra_{key}" if key in _STANDARD_ATTRS else key): value
                for key, value in extra.items()
            }
        return super().makeRecord(name, level, fn, lno, msg, args, exc_info, func, extra, sinfo)


def install_safe_logger() -> None:
    """Loggers made from now on are SafeLoggers; those made earlier are converted in place."""
    logging.setLoggerClass(SafeLogger)
    for logger in logging.Logger.manager.loggerDict.values():
        if type(logger) is logging.Logger:
            logger.__class__ = SafeLogger


install_safe_logger()


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD_ATTRS or key.startswith("_"):
            continue
        if any(marker in key.lower() for marker in _SENSITIVE_MARKERS):
            value = "[redacted]"
        extras[key] = value
    return extras


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<5} {record.name}: {record.getMessage()}"
        pairs = " ".join(f"{key}={value}" for key, value in _extras(record).items())
        if pairs:
            line = f"{line} {pairs}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # Third-party chatter stays at WARN unless we are tracing.
    noisy_level = logging.DEBUG if LEVELS[level] <= TRACE else logging.WARNING
    for name in ("aiohttp.access", "livekit", "asyncio"):
        logging.getLogger(name).setLevel(noisy_level)


def describe(exc: BaseException) -> str:
    """`Type: text` of an exception on one line, for logs; never raises."""
    try:
        text = " ".join(str(exc).split())
    except Exception:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
