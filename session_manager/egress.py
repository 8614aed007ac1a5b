"""Which addresses the manager may call: the guard against server-side request forgery (SSRF).

A microservice `endpoint` is a URL anyone who may register gives the manager, and the manager
then calls it (join-room with a fresh LiveKit token, leave-room, health). Without a guard that
makes the manager a proxy into its own network: the cloud metadata service at 169.254.169.254,
every local port, and a port scanner through `last_error`. So:

- `endpoint_allow` lists the CIDRs and host names endpoints may use (default: loopback and the
  private ranges). An IP address must lie in one of the CIDRs. A host name listed there may
  resolve to any address; any other host name only to addresses in the CIDRs.
- Link-local (169.254.0.0/16, fe80::/10), unspecified (0.0.0.0/8, ::), multicast and broadcast
  addresses are refused unless a CIDR *inside* their range is listed (`169.254.169.254/32`
  allows that one address; `0.0.0.0/0` does not).
- An endpoint with user-info, a query or a fragment is refused, and so is a numeric host that
  is not a canonical IPv4 address (`2130706433`, `127.1`).
- Host names are resolved and checked at registration (`EndpointGuard.check_registration`),
  and again at every call: the HTTP clients that call services resolve through
  `GuardedResolver`, which hands aiohttp only the allowed addresses, so the address checked is
  the address connected to (a name that rebinds to 169.254.169.254 after registering gets no
  connection). IP literals never reach a resolver; `EndpointGuard.check_call` checks them.

What a refused call reports is generic on purpose ("not reachable or not allowed"): the reason
is logged for the operator, not handed to whoever registered the endpoint.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from urllib.parse import SplitResult, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from pydantic_core import PydanticCustomError

from session_manager.errors import InvalidRequest

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ENDPOINT_ALLOW: tuple[str, ...] = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)

# Never reached through a broad CIDR: only a CIDR inside one of these ranges allows them.
SPECIAL_RANGES: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "169.254.0.0/16",  # link-local (cloud metadata services live here)
        "fe80::/10",
        "0.0.0.0/8",  # unspecified / "this network": Linux connects 0.0.0.0 to itself
        "::/128",
        "224.0.0.0/4",  # multicast
        "ff00::/8",
        "255.255.255.255/32",  # broadcast
    )
)

RESOLVE_TIMEOUT = 3.0  # seconds for one host-name look-up, at registration and per call
LOOKUP_THREADS = 4  # look-ups run on threads of their own, never the loop's default executor

_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")

Lookup = Callable[[str, int], Awaitable[list[str]]]
"""Resolves (host, port) to IP address strings; raises OSError when the name does not resolve.
Tests pass their own (a table of names) instead of the system resolver."""


class AddressRefused(OSError):
    """A host name resolved only to addresses `endpoint_allow` does not allow. An OSError, so
    aiohttp reports it like any failed look-up (ClientConnectorDNSError)."""


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:169.254.169.254) is checked as the IPv4 it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _special_range(address: IPAddress) -> IPNetwork | None:
    for special in SPECIAL_RANGES:
        if special.version == address.version and address in special:
            return special
    return None


def parse_ip(host: str) -> IPAddress | None:
    """The address of an IP-literal host ("[::1]" may come with its brackets); None for a
    host name."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class EndpointAllow:
    """The parsed `endpoint_allow` setting."""

    networks: tuple[IPNetwork, ...]
    names: frozenset[str]  # exact host names, lower case, without a trailing dot
    suffixes: tuple[str, ...]  # from "*.example.internal": ".example.internal"

    @classmethod
    def parse(cls, entries: Iterable[str]) -> EndpointAllow:
        """Each entry a CIDR, an IP address, a host name or `*.domain`; ValueError naming the
        first entry that is none of these."""
        networks: list[IPNetwork] = []
        names: set[str] = set()
        suffixes: list[str] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if (
                "/" in name
                or not _HOST_NAME.match(name)
                or _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1])
            ):
                raise ValueError(f"{entry!r} is neither a CIDR nor a host name")
            if name.startswith("*."):
                suffixes.append(name[1:])
            else:
                names.add(name)
        return cls(tuple(networks), frozenset(names), tuple(suffixes))

    def allows_address(self, address: IPAddress) -> bool:
        """Whether the manager may connect to `address`, whatever name led there."""
        address = _unmapped(address)
        special = _special_range(address)
        for network in self.networks:
            if network.version != address.version or address not in network:
                continue
            if special is None or network.subnet_of(special):  # type: ignore[arg-type]
                return True
        return False

    def allows_name(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self.names or any(name.endswith(suffix) for suffix in self.suffixes)

    def allows_resolved(self, host: str, address: IPAddress) -> bool:
        """Whether `host`, resolved to `address`, may be connected to: a listed name may
        resolve anywhere but to a special address (unless that is listed explicitly)."""
        if self.allows_address(address):
            return True
        return self.allows_name(host) and _special_range(_unmapped(address)) is None


def _refused(detail: str) -> InvalidRequest:
    return InvalidRequest(f"endpoint: {detail}")


def endpoint_parts(endpoint: str) -> SplitResult:
    """The URL split, once it is one the manager may store: http(s), a host, and no user-info,
    query or fragment. ValueError (a sentence fit for the caller) otherwise."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("must not contain user-info (user:password@)")
    if "?" in endpoint:
        raise ValueError("must not contain a query ('?')")
    if "#" in endpoint:
        raise ValueError("must not contain a fragment ('#')")
    host = parts.hostname
    if parse_ip(host) is None and _NUMERIC_LABEL.match(host.rstrip(".").rsplit(".", 1)[-1]):
        raise ValueError("a numeric host must be a canonical IPv4 address (like 10.0.0.7)")
    return parts


def check_endpoint_form(value: str) -> str:
    """Pydantic validator of the `endpoint` field: see `endpoint_parts`."""
    try:
        endpoint_parts(value)
    except ValueError as exc:
        raise PydanticCustomError("url_parts", "{detail}", {"detail": str(exc)}) from None
    return value


def safe_origin(endpoint: str) -> str:
    """scheme://host[:port] of an endpoint, for logs and errors: never its user-info."""
    try:
        parts = urlsplit(endpoint)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(not a URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


class _SystemLookup:
    """getaddrinfo on a small pool of threads of its own: slow DNS holds up no other work."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="egress-dns")

    async def __call__(self, host: str, port: int) -> list[str]:
        try:
            infos = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM),
            )
        except UnicodeError:  # a name IDNA cannot encode ("\x80"): no such host, not a crash
            raise socket.gaierror(socket.EAI_NONAME, "not a valid host name") from None
        return [str(info[4][0]) for info in infos]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that hands the connector only the addresses `endpoint_allow`
    allows for the name: what is checked is what is connected to."""

    def __init__(self, allow: EndpointAllow, lookup: Lookup, timeout: float) -> None:
        self._allow = allow
        self._lookup = lookup
        self._timeout = timeout

    async def allowed_addresses(self, host: str, port: int) -> list[str]:
        """The addresses of `host` the manager may connect to; AddressRefused when there are
        none, OSError (TimeoutError included) when the name does not resolve in time."""
        addresses = await asyncio.wait_for(self._lookup(host, port), self._timeout)
        allowed = []
        for text in dict.fromkeys(addresses):  # unique, in the resolver's order
            address = parse_ip(text)
            if address is not None and self._allow.allows_resolved(host, address):
                allowed.append(text)
        if not allowed:
            log.warning(
                "endpoint host resolves to no allowed address",
                extra={"host": host, "port": port, "resolved": len(addresses)},
            )
            raise AddressRefused(f"{host} resolves to no address endpoint_allow allows")
        return allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        for text in await self.allowed_addresses(host, port):
            v6 = ":" in text
            if family not in (socket.AF_UNSPEC, socket.AF_INET6 if v6 else socket.AF_INET):
                continue
            results.append(
                ResolveResult(
                    hostname=host,
                    host=text,
                    port=port,
                    family=socket.AF_INET6 if v6 else socket.AF_INET,
                    proto=0,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not results:
            raise AddressRefused(f"{host} has no allowed address of the family asked for")
        return results

    async def close(self) -> None:
        """Nothing to release here: the guard owns the look-up threads."""


class EndpointGuard:
    """Checks endpoints against `endpoint_allow`: at registration (async: resolves the name)
    and before each call (IP literals; names are checked by `resolver` as they connect)."""

    def __init__(
        self,
        allow: EndpointAllow,
        *,
        lookup: Lookup | None = None,
        resolve_timeout: float = RESOLVE_TIMEOUT,
    ) -> None:
        self.allow = allow
        self._system: _SystemLookup | None = None
        if lookup is None:
            self._system = lookup = _SystemLookup()
        self.resolver = GuardedResolver(allow, lookup, resolve_timeout)

    async def aclose(self) -> None:
        if self._system is not None:
            self._system.close()

    async def check_registration(self, endpoint: str) -> None:
        """InvalidRequest naming `endpoint` unless the manager may call it now."""
        try:
            parts = endpoint_parts(endpoint)
        except ValueError as exc:
            raise _refused(str(exc)) from None
        host = parts.hostname or ""
        address = parse_ip(host)
        if address is not None:
            if not self.allow.allows_address(address):
                raise _refused("the address is not one the manager may call (endpoint_allow)")
            return
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            await self.resolver.allowed_addresses(host, port)
        except AddressRefused:
            raise _refused("the host is not one the manager may call (endpoint_allow)") from None
        except (OSError, TimeoutError):
            raise _refused("the host name does not resolve") from None

    def check_call(self, endpoint: str) -> str | None:
        """Before a call: None when it may go out (a host name is checked again as it is
        resolved), else why not (for the log; the caller reports it generically)."""
        try:
            parts = endpoint_parts(endpoint)
        except ValueError as exc:
            return str(exc)
        address = parse_ip(parts.hostname or "")
        if address is not None and not self.allow.allows_address(address):
            return "address not allowed by endpoint_allow"
        return None
