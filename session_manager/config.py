"""Every setting, its default and its environment name; validated once at start-up.

Precedence, lowest first: built-in defaults < the TOML config file < environment < command-line
flags. The config file is `--config PATH`, else `$SESSION_MANAGER_CONFIG`, else
`config/session-manager.toml` when it exists in the working directory.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from session_manager.api_keys import RateLimit, parse_api_keys
from session_manager.egress import DEFAULT_ENDPOINT_ALLOW, EndpointAllow
from session_manager.pools import WarmPoolSetting, check_pools

ENV_PREFIX = "SESSION_MANAGER_"
DEFAULT_CONFIG_FILE = Path("config/session-manager.toml")

# LiveKit's own tools read these names; we honour them so one environment serves both.
LIVEKIT_ENV_ALIASES = {
    "livekit_url": "LIVEKIT_URL",
    "livekit_api_key": "LIVEKIT_API_KEY",
    "livekit_api_secret": "LIVEKIT_API_SECRET",
}

LogLevel = Literal["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]


class Settings(BaseModel):
    """The validated configuration of one Session Manager process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address the HTTP API listens on")
    port: int = Field(8080, ge=0, le=65535, description="port the HTTP API listens on (0: any)")
    log_level: LogLevel = Field("INFO", description="ERROR, WARN, INFO, DEBUG or TRACE")
    log_format: Literal["text", "json"] = Field("text", description="log line format")

    store: Literal["sqlite", "memory", "redis"] = Field(
        "sqlite", description="where sessions and registrations are kept"
    )
    data_dir: Path = Field(Path("var"), description="folder of the SQLite database")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis of store = redis (redis://, rediss:// or unix://; may hold a password, "
        "which is never logged)",
    )
    redis_timeout: float = Field(
        2.0, gt=0, description="seconds for one Redis operation, retries included"
    )
    redis_prefix: str = Field(
        "session-manager:", description="prefix of every Redis key of this store"
    )

    livekit_url: str | None = Field(
        None, description="external LiveKit server (ws/http URL); unset: run a managed one"
    )
    livekit_api_key: str | None = Field(None, description="API key of the external LiveKit")
    livekit_api_secret: SecretStr | None = Field(
        None, description="API secret of the external LiveKit"
    )
    livekit_public_url: str | None = Field(
        None, description="LiveKit URL handed to clients and services (default: livekit_url)"
    )
    livekit_server_binary: str | None = Field(
        None,
        description="managed livekit-server binary (default: the cache of `session-manager "
        "install-livekit`, a clone's .cache/bin, then PATH)",
    )
    livekit_port: int = Field(7880, ge=1, le=65535, description="managed LiveKit HTTP port")
    livekit_rtc_tcp_port: int = Field(7881, ge=1, le=65535, description="managed LiveKit TCP")
    livekit_rtc_udp_port: int = Field(7882, ge=1, le=65535, description="managed LiveKit UDP")
    livekit_webhook_url: str | None = Field(
        None, description="URL LiveKit posts webhooks to (default: this API's own)"
    )
    livekit_timeout: float = Field(5.0, gt=0, description="seconds for one LiveKit API call")
    livekit_start_timeout: float = Field(
        30.0, gt=0, description="seconds to wait for the managed LiveKit to answer"
    )
    deployment: str = Field(
        "default",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="name tagged on the rooms this manager creates; managers that share one "
        "LiveKit but not a store need different names",
    )
    room_sweep_interval: float = Field(
        60.0, gt=0, description="seconds between comparisons of LiveKit's rooms with the sessions"
    )
    livekit_probe_interval: float = Field(
        2.0, gt=0, le=60, description="seconds between checks that LiveKit answers"
    )
    livekit_restart_max_backoff: float = Field(
        30.0, gt=0, description="longest wait between restarts of a managed LiveKit that died"
    )

    join_timeout: float = Field(
        30.0, gt=0, description="seconds for required services to join before the session ends"
    )
    dispatch_timeout: float = Field(10.0, gt=0, description="seconds for one join-room call")
    dispatch_attempts: int = Field(3, ge=1, le=20, description="join-room attempts per service")
    dispatch_backoff: float = Field(
        0.2, ge=0, description="seconds before the first join-room retry (doubles each time)"
    )
    max_redispatch: int = Field(
        3, ge=0, le=100, description="redispatches per service slot before the session ends"
    )
    client_join_timeout: float = Field(
        300.0, gt=0, description="seconds for the user to join before the session ends"
    )
    client_reconnect_grace: float = Field(
        60.0, gt=0, description="seconds a user who left may take to come back"
    )
    health_interval: float = Field(10.0, gt=0, description="seconds between health checks")
    health_timeout: float = Field(2.0, gt=0, description="seconds for one health check")
    unhealthy_after: int = Field(3, ge=1, description="failed checks in a row to be Unhealthy")
    healthy_after: int = Field(2, ge=1, description="good checks in a row to be Healthy again")
    health_concurrency: int = Field(
        64, ge=1, le=10_000, description="health checks in flight at once, at most"
    )
    presence_interval: float = Field(
        0.25, gt=0, le=10, description="seconds between presence beats, each way (SDK services)"
    )
    presence_timeout: float = Field(
        0.75, gt=0, le=60, description="seconds of presence silence that end the connection"
    )
    presence_grace: float = Field(
        0.3,
        ge=0,
        le=60,
        description="seconds a dropped SDK instance has to reconnect before "
        "it is lost and its sessions move",
    )
    endpoint_allow: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ENDPOINT_ALLOW),
        description="CIDRs and host names microservice endpoints may use; link-local, multicast, "
        "unspecified and broadcast addresses only when a CIDR inside their range is listed "
        "(env/flag: ',' or ';'-separated)",
    )
    session_retention: float = Field(
        7 * 86400.0, gt=0, description="seconds an ended session stays readable (from creation)"
    )
    idempotency_ttl: float = Field(
        86400.0, gt=0, description="seconds an Idempotency-Key is remembered"
    )
    room_empty_timeout: int = Field(
        300, ge=1, description="seconds LiveKit keeps a room nobody joined"
    )
    client_token_ttl: float = Field(
        6 * 3600.0, gt=0, description="client token lifetime without duration_limit (seconds)"
    )
    max_body_bytes: int = Field(65536, ge=1024, description="largest request body accepted")
    max_metadata_bytes: int = Field(
        16384, ge=256, le=1_048_576, description="largest metadata object, serialised as JSON"
    )
    max_session_duration: float = Field(
        86400.0, gt=0, description="largest metadata.duration_limit accepted (seconds)"
    )
    store_max_pending: int = Field(
        50_000,
        ge=100,
        description="session views waiting to be written, at most; past it new sessions get 503",
    )
    store_flush_timeout: float = Field(
        10.0, gt=0, description="seconds to wait for pending writes at start-up and shutdown"
    )
    cors_allow_origins: list[str] | None = Field(
        None,
        description="origins whose web pages may call the API ('*': any; unset: '*' without "
        "api_keys, none with them; env/flag: ','-separated)",
    )

    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="API keys: '<key> <scope>[,<scope>...]', scopes admin, client, service; a key "
        "may be given as 'sha256:<hex>' (env/flag: ';'-separated)",
    )
    allow_unauthenticated: bool = Field(
        False, description="serve without api_keys on a host that is not loopback (warns at start)"
    )
    rate_limit: str | None = Field(
        None,
        description="requests a second per API key (per client address without keys) and the "
        "burst, e.g. '10/20'; past it 429",
    )
    gc_pacing: bool = Field(
        True,
        description="run Python's full garbage collections small and often (every 0.1 s, then "
        "freeze the survivors) instead of one pause that grows with the live sessions",
    )
    switch_interval: float = Field(
        0.001,
        ge=0.0001,
        le=0.1,
        description="seconds a thread may keep Python's GIL while another waits for it "
        "(sys.setswitchinterval; CPython's default is 0.005): the store's disk thread gets it back "
        "this soon while the event loop is busy, so a create waiting on a write waits less",
    )
    max_live_sessions: int = Field(
        10_000, ge=1, description="live sessions at most; past it a create gets 503 AtCapacity"
    )
    max_sessions_per_user: int | None = Field(
        None, ge=1, description="live sessions of one user_identity at most; past it 429"
    )
    warm_pools: list[WarmPoolSetting] = Field(
        default_factory=list,
        description="warm pools: rooms kept with their services joined, e.g. "
        '[{services = ["type:ASR", "type:TTS"], size = 5, max_idle = 600}] '
        "(env/flag: JSON); see README 'Warm pools'",
    )
    max_event_streams: int = Field(
        10_000, ge=1, description="open event streams (SSE) at most; past it 429"
    )
    max_services: int = Field(
        10_000, ge=1, description="registered microservices at most; past it 429"
    )

    event_history: int = Field(
        10_000, ge=1, description="events kept for Last-Event-ID resumption and polling"
    )
    event_keepalive: float = Field(
        15.0, gt=0, description="seconds between SSE keep-alive comments on an idle stream"
    )
    webhooks: list[str] = Field(
        default_factory=list,
        description="outbound webhook targets: 'URL' or 'URL Type,Type' (env/flag: ';'-separated)",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="secret that signs outbound webhooks (Standard Webhooks): 'whsec_<base64>', "
        "or a plain string whose UTF-8 bytes are the key",
    )
    webhook_timeout: float = Field(5.0, gt=0, description="seconds for one webhook POST")
    webhook_max_attempts: int = Field(5, ge=1, description="attempts per webhook delivery")
    webhook_backoff: float = Field(0.5, gt=0, description="first webhook retry delay (doubles)")
    webhook_max_backoff: float = Field(30.0, gt=0, description="longest webhook retry delay")
    webhook_queue: int = Field(10_000, ge=1, description="webhook deliveries waiting, at most")
    webhook_concurrency: int = Field(4, ge=1, description="webhook POSTs in flight per target")
    shutdown_timeout: float = Field(10.0, gt=0, description="seconds for each shutdown stage")
    lease_ttl: float = Field(
        5.0,
        ge=0.5,
        le=300,
        description="store = redis: seconds a manager process owns its sessions without renewing; "
        "a process that dies has its sessions adopted by the others about this long after",
    )
    shutdown_mode: Literal["keep", "end"] = Field(
        "keep",
        description="on SIGTERM: 'keep' leaves live sessions running (rooms, clients, services) "
        "for the next process to adopt; 'end' ends them and deletes their rooms (with the "
        "memory store, or the managed LiveKit whose rooms stop with it, sessions always end)",
    )

    @field_validator("livekit_url", "livekit_public_url", "livekit_webhook_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"ws", "wss", "http", "https"} or not parts.hostname:
            raise ValueError("must be an absolute ws(s):// or http(s):// URL")
        return value.rstrip("/")

    @field_validator("webhooks", mode="before")
    @classmethod
    def _split_targets(cls, value: object) -> object:
        # From the environment or a flag the list comes as one string: targets split by ';'.
        if isinstance(value, str):
            return [part.strip() for part in value.split(";") if part.strip()]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(";") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _valid_keys(cls, entries: list[SecretStr]) -> list[SecretStr]:
        parse_api_keys(entry.get_secret_value() for entry in entries)  # its errors show no key
        return entries

    @field_validator("rate_limit")
    @classmethod
    def _valid_rate(cls, value: str | None) -> str | None:
        return None if value is None else str(RateLimit.parse(value))

    @field_validator("warm_pools", mode="before")
    @classmethod
    def _parse_pools(cls, value: object) -> object:
        # From the environment or a flag the list comes as one JSON string.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("must be a JSON list of pools") from None
        return value

    @field_validator("warm_pools")
    @classmethod
    def _bounded_pools(cls, pools: list[WarmPoolSetting]) -> list[WarmPoolSetting]:
        return check_pools(pools)

    @field_validator("endpoint_allow", mode="before")
    @classmethod
    def _split_allow(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.replace(";", ",").split(",") if part.strip()]
        return value

    @field_validator("endpoint_allow")
    @classmethod
    def _valid_allow(cls, entries: list[str]) -> list[str]:
        EndpointAllow.parse(entries)  # ValueError naming the entry that is not one
        return entries

    @field_validator("cors_allow_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhooks")
    @classmethod
    def _webhook_urls(cls, targets: list[str]) -> list[str]:
        for target in targets:
            url = target.split(" ", 1)[0]
            parts = urlsplit(url)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(f"{url!r} is not an absolute http(s) URL")
        return targets

    @property
    def uses_managed_livekit(self) -> bool:
        return self.livekit_url is None


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


class SettingsError(Exception):
    """An invalid setting; the message is one line that names it and where it came from."""


@dataclass(frozen=True)
class _Source:
    values: Mapping[str, Any]
    describe: Mapping[str, str]


def _file_source(path: Path | None) -> _Source:
    explicit = path is not None
    if path is None:
        from_env = os.environ.get(ENV_PREFIX + "CONFIG")
        path = Path(from_env) if from_env else DEFAULT_CONFIG_FILE
        explicit = from_env is not None
    if not path.exists():
        if explicit:
            raise SettingsError(f"invalid setting config: file {path} does not exist")
        return _Source({}, {})
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"invalid setting config: cannot read {path}: {exc}") from None
    return _Source(values, {key: f"config file {path}" for key in values})


def _env_source(environ: Mapping[str, str]) -> _Source:
    values: dict[str, Any] = {}
    describe: dict[str, str] = {}
    for field in Settings.model_fields:
        names = [env_name(field)]
        if field in LIVEKIT_ENV_ALIASES:
            names.insert(0, LIVEKIT_ENV_ALIASES[field])
        for name in names:
            if name in environ and environ[name] != "":
                values[field] = environ[name]
                describe[field] = f"environment {name}"
                break
    return _Source(values, describe)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults, file, environment and flags, and validate the result once."""
    sources = [
        _file_source(config_file),
        _env_source(os.environ if environ is None else environ),
        _Source(
            {k: v for k, v in (flags or {}).items() if v is not None},
            {k: f"flag --{k.replace('_', '-')}" for k in flags or {}},
        ),
    ]
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source in sources:
        merged.update(source.values)
        origin.update(source.describe)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "?"
        # A nested field (warm_pools.0.size) came from where its setting did.
        top = str(first["loc"][0]) if first["loc"] else field
        where = origin.get(field) or origin.get(top, "default")
        if first["type"] == "extra_forbidden":
            raise SettingsError(f"unknown setting {field} (from {where})") from None
        raise SettingsError(f"invalid setting {field} (from {where}): {first['msg']}") from None
    _check_livekit_credentials(settings)
    _check_cluster(settings)
    _check_webhooks(settings)
    _check_exposure(settings)
    return settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_exposure(settings: Settings) -> None:
    """Without API keys, whoever reaches the port controls the manager: only loopback, unless
    the operator says otherwise."""
    if settings.api_keys or settings.allow_unauthenticated or is_loopback(settings.host):
        return
    raise SettingsError(
        f"invalid setting api_keys: required when host {settings.host} is not a loopback "
        "address (or set allow_unauthenticated = true to serve without keys)"
    )


def _check_webhooks(settings: Settings) -> None:
    if settings.webhooks and (
        settings.webhook_secret is None or not settings.webhook_secret.get_secret_value()
    ):
        raise SettingsError("invalid setting webhook_secret: required when webhooks are set")
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    if secret.startswith("whsec_"):
        encoded = secret.removeprefix("whsec_")
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except ValueError:  # binascii.Error is one
            key = b""
        if not key:
            raise SettingsError("invalid setting webhook_secret: whsec_ must be followed by base64")


def _check_cluster(settings: Settings) -> None:
    """Managers sharing a Redis share one LiveKit: a managed one would be one per process.
    Warm pools are one process's: with several managers they are refused (README)."""
    if settings.store == "redis" and settings.warm_pools:
        raise SettingsError(
            "invalid setting warm_pools: not available with store = redis (a pool's members "
            "belong to one process and would not count toward the cluster's max_live_sessions)"
        )
    if settings.store == "redis" and settings.livekit_url is None:
        raise SettingsError(
            "invalid setting livekit_url: required when store = redis (the managers sharing a "
            "Redis must share one LiveKit)"
        )


def _check_livekit_credentials(settings: Settings) -> None:
    has_key = bool(settings.livekit_api_key)
    has_secret = settings.livekit_api_secret is not None and bool(
        settings.livekit_api_secret.get_secret_value()
    )
    if settings.livekit_url is None:
        # A managed LiveKit takes a given key pair whole, or generates its own.
        if has_key != has_secret:
            raise SettingsError(
                "invalid setting livekit_api_key/livekit_api_secret: give both or neither"
            )
        return
    if not has_key:
        raise SettingsError("invalid setting livekit_api_key: required when livekit_url is set")
    if not has_secret:
        raise SettingsError("invalid setting livekit_api_secret: required when livekit_url is set")


def reference_file() -> str:
    """config/session-manager.toml as shipped: every setting, its default (commented out), its
    description and environment names. A test keeps the shipped file equal to this."""
    lines = [
        "# Session Manager configuration. Every setting is listed with its default, commented out.",
        "# Precedence, lowest first: defaults < this file < environment < command-line flags.",
        "# This file is read from config/session-manager.toml in the working directory, or from",
        "# --config PATH / $SESSION_MANAGER_CONFIG. Environment names are given for each setting.",
        "",
    ]
    for name, field in Settings.model_fields.items():
        names = [env_name(name)]
        if name in LIVEKIT_ENV_ALIASES:
            names.insert(0, LIVEKIT_ENV_ALIASES[name])
        lines.append(f"# {field.description} [{' / '.join(names)}]")
        lines.append(f"# {name} = {_toml_default(field.get_default(call_default_factory=True))}")
        lines.append("")
    return "\n".join(lines)


def _toml_default(value: object) -> str:
    if value is None or isinstance(value, SecretStr):
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        items = ", ".join(f'"{item}"' for item in value)
        return f"[{items}]"
    return f'"{value}"'
