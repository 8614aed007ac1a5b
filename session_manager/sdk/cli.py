"""A service's settings from its command line and its environment, livekit-agents style.

Precedence, lowest first: the SDK's defaults < the values given in code (`run_service(...,
port=8002)`) < the environment < the command line. The environment names the manager and the
service's API key: `SESSION_MANAGER_URL`, `SESSION_MANAGER_API_KEY` (never a flag: the command
lines of a machine's processes are readable by all its users). The flags:

    --service-id ID  --host HOST  --port N  --manager-url URL  --advertise-url URL
    --trust-livekit-url URL (repeatable, adds to those given in code)  --max-sessions N
    --log-level LEVEL  --no-presence

`SESSION_MANAGER_PRESENCE=off` (or `--no-presence`) turns the presence connection off: the
manager then finds a dead process by its health checks only (see `presence`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from typing import Any

MANAGER_URL_ENV = "SESSION_MANAGER_URL"
API_KEY_ENV = "SESSION_MANAGER_API_KEY"
PRESENCE_ENV = "SESSION_MANAGER_PRESENCE"
_OFF = frozenset({"off", "0", "false", "no"})
DEFAULT_MANAGER_URL = "http://127.0.0.1:8080"
DEFAULT_HOST = "127.0.0.1"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def manager_url_from(environ: Mapping[str, str], default: str | None) -> str | None:
    """`SESSION_MANAGER_URL` when it is set (and not empty), else `default`."""
    return environ.get(MANAGER_URL_ENV) or default


def api_key_from(environ: Mapping[str, str], default: str | None) -> str | None:
    """`SESSION_MANAGER_API_KEY` when it is set (and not empty), else `default`."""
    return environ.get(API_KEY_ENV) or default


def presence_from(environ: Mapping[str, str], default: bool = True) -> bool:
    """False when `SESSION_MANAGER_PRESENCE` is `off` (or 0, false, no), else `default`."""
    value = environ.get(PRESENCE_ENV, "").strip().lower()
    return False if value in _OFF else default


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {value}")
    return value


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return level


def add_service_arguments(
    parser: argparse.ArgumentParser,
    *,
    service_id: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = 0,
    manager_url: str | None = DEFAULT_MANAGER_URL,
    advertise_url: str | None = None,
    trusted_livekit_urls: Iterable[str] = (),
    max_sessions: int | None = None,
    log_level: str = "INFO",
    environ: Mapping[str, str] | None = None,
    presence: bool = True,
) -> argparse.ArgumentParser:
    """Add the SDK's flags to `parser`, each defaulting to the environment's value, else to the
    value given here (the code's). `--service-id` is required when no `service_id` is given.
    `parser.parse_args()` then holds the settings, ready for `runner_options`."""
    environ = os.environ if environ is None else environ
    group = parser.add_argument_group("session manager service")
    group.add_argument(
        "--service-id",
        default=service_id,
        required=service_id is None,
        help="the id to register as" + (f" (default: {service_id})" if service_id else ""),
    )
    group.add_argument("--host", default=host, help=f"address to listen on (default: {host})")
    group.add_argument(
        "--port", type=int, default=port, help=f"port to listen on, 0: any (default: {port})"
    )
    group.add_argument(
        "--manager-url",
        default=manager_url_from(environ, manager_url),
        help=f"the session manager to register with (env {MANAGER_URL_ENV}; "
        f"default: {manager_url})",
    )
    group.add_argument(
        "--advertise-url",
        default=advertise_url,
        help="URL the manager should call (default: http://HOST:PORT)",
    )
    group.add_argument(
        "--trust-livekit-url",
        action="append",
        default=list(trusted_livekit_urls),
        metavar="URL",
        help="a LiveKit URL join-room may name besides the one the manager reports (repeatable)",
    )
    group.add_argument(
        "--max-sessions",
        type=_positive_int,
        default=max_sessions,
        help="sessions served at once; a join-room beyond is declined with 503 "
        "(default: the registration metadata's max_sessions, else no limit)",
    )
    group.add_argument(
        "--no-presence",
        dest="presence",
        action="store_false",
        default=presence_from(environ, presence),
        help="keep no presence connection to the manager: a dead process is then found by "
        f"the health checks only (env {PRESENCE_ENV}=off)",
    )
    group.add_argument(
        "--log-level",
        type=_log_level,
        default=_log_level(log_level),
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        help=f"(default: {log_level})",
    )
    return parser


def runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `MicroserviceRunner` keyword arguments the flags of `add_service_arguments` set
    (all but `service_id` and `log_level`, which are for its first argument and the logging)."""
    return {
        "host": args.host,
        "port": args.port,
        "manager_url": args.manager_url,
        "advertise_url": args.advertise_url,
        "trusted_livekit_urls": tuple(args.trust_livekit_url),
        "max_sessions": args.max_sessions,
        "presence": args.presence,
    }
