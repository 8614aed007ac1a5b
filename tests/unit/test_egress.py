"""The SSRF guard (`session_manager.egress`): which addresses and host names `endpoint_allow`
lets the manager call, the endpoint forms refused, and host names checked when they resolve.

Host names are resolved by a table of names given to the guard (`NameTable`), never by DNS."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from session_manager.config import SettingsError, load_settings
from session_manager.egress import (
    DEFAULT_ENDPOINT_ALLOW,
    AddressRefused,
    EndpointAllow,
    EndpointGuard,
    endpoint_parts,
    safe_origin,
)
from session_manager.errors import InvalidRequest

DEFAULT = EndpointAllow.parse(DEFAULT_ENDPOINT_ALLOW)


class NameTable:
    """A hosts file for the guard: name -> addresses; an unknown name does not resolve."""

    def __init__(self, **names: list[str]) -> None:
        self.names = {name.replace("_", "."): addresses for name, addresses in names.items()}
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.names[host]


def allowed(allow: EndpointAllow, address: str) -> bool:
    return allow.allows_address(ipaddress.ip_address(address))


# endpoint_allow ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.31.255.254", "192.168.0.7", "fd00::7"],
)
def test_the_default_allows_loopback_and_the_private_ranges(address: str) -> None:
    assert allowed(DEFAULT, address)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",  # the cloud metadata service
        "fe80::1",  # link-local
        "0.0.0.0",  # unspecified: Linux connects it to the host itself
        "::",
        "224.0.0.1",  # multicast
        "ff02::1",
        "255.255.255.255",  # broadcast
        "8.8.8.8",  # public
        "172.32.0.1",  # just outside 172.16/12
        "::ffff:169.254.169.254",  # IPv4-mapped: checked as the IPv4 it is
    ],
)
def test_the_default_refuses_link_local_unspecified_multicast_broadcast_and_public(
    address: str,
) -> None:
    assert not allowed(DEFAULT, address)


def test_an_ipv4_mapped_loopback_is_loopback() -> None:
    assert allowed(DEFAULT, "::ffff:127.0.0.1")


def test_special_addresses_need_a_cidr_inside_their_range() -> None:
    everything = EndpointAllow.parse(["0.0.0.0/0", "::/0"])
    assert allowed(everything, "8.8.8.8") and allowed(everything, "2001:db8::1")
    for special in ("169.254.169.254", "fe80::1", "0.0.0.0", "224.0.0.1", "255.255.255.255"):
        assert not allowed(everything, special), special

    explicit = EndpointAllow.parse(["169.254.169.254/32", "fe80::/10"])
    assert allowed(explicit, "169.254.169.254") and allowed(explicit, "fe80::1")
    assert not allowed(explicit, "169.254.169.253")


def test_entries_are_cidrs_addresses_host_names_and_wildcards() -> None:
    allow = EndpointAllow.parse(
        ["10.0.0.1/8", "2001:db8::1", " Pong.Internal. ", "*.svc.cluster.local", ""]
    )
    assert allowed(allow, "10.200.0.1")  # host bits are ignored: 10.0.0.0/8
    assert allowed(allow, "2001:db8::1") and not allowed(allow, "2001:db8::2")
    assert allow.allows_name("pong.internal") and allow.allows_name("PONG.internal.")
    assert allow.allows_name("asr.default.svc.cluster.local")
    assert not allow.allows_name("svc.cluster.local.evil.test")
    assert not allow.allows_name("other.internal")


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "not a host", "http://h", "1.2.3", "a/b"])
def test_a_bad_entry_is_refused_by_name(entry: str) -> None:
    with pytest.raises(ValueError, match="neither a CIDR nor a host name"):
        EndpointAllow.parse([entry])


def test_the_setting_splits_on_commas_and_semicolons_and_names_a_bad_entry() -> None:
    settings = load_settings(
        {}, environ={"SESSION_MANAGER_ENDPOINT_ALLOW": "10.0.0.0/8; pong.internal,*.svc"}
    )
    assert settings.endpoint_allow == ["10.0.0.0/8", "pong.internal", "*.svc"]
    assert load_settings({}, environ={}).endpoint_allow == list(DEFAULT_ENDPOINT_ALLOW)
    with pytest.raises(SettingsError, match="endpoint_allow"):
        load_settings({}, environ={"SESSION_MANAGER_ENDPOINT_ALLOW": "10.0.0.0/33"})


# endpoint forms ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("http://user:pw@127.0.0.1:9", "user-info"),
        ("http://user@127.0.0.1:9", "user-info"),
        ("http://127.0.0.1:9/?x=1", "query"),
        ("http://127.0.0.1:9/?", "query"),
        ("http://127.0.0.1:9/#top", "fragment"),
        ("http://2130706433:9", "canonical IPv4"),  # 127.0.0.1 as one number
        ("http://127.1:9", "canonical IPv4"),
        ("http://0x7f.0.0.1:9", "canonical IPv4"),
        ("ftp://127.0.0.1", "http"),
    ],
)
def test_endpoint_forms_that_are_refused(endpoint: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        endpoint_parts(endpoint)


def test_the_origin_of_an_endpoint_never_shows_its_user_info() -> None:
    assert safe_origin("https://user:pw@pong.internal:8443/x") == "https://pong.internal:8443"
    assert safe_origin("http://[::1]:9/") == "http://[::1]:9"


# checked at registration -----------------------------------------------------------------------


async def test_registration_accepts_allowed_addresses_and_names() -> None:
    names = NameTable(pong_internal=["10.0.0.7"], localhost=["127.0.0.1", "::1"])
    guard = EndpointGuard(DEFAULT, lookup=names)
    await guard.check_registration("http://127.0.0.1:8001")
    await guard.check_registration("http://[::1]:8001/prefix")
    await guard.check_registration("http://pong.internal:9000")
    await guard.check_registration("http://localhost:8001")


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]:80",
        "http://0.0.0.0:8001",
        "http://8.8.8.8",
        "http://metadata.test",  # resolves to 169.254.169.254
        "http://public.test",  # resolves outside every allowed range
        "http://127.0.0.1:8001/?next=http://169.254.169.254",
    ],
)
async def test_registration_refuses_what_the_manager_may_not_call(endpoint: str) -> None:
    names = NameTable(metadata_test=["169.254.169.254"], public_test=["93.184.215.14"])
    guard = EndpointGuard(DEFAULT, lookup=names)
    with pytest.raises(InvalidRequest) as refused:
        await guard.check_registration(endpoint)
    assert refused.value.message.startswith("endpoint: ")
    assert "169.254" not in refused.value.message and "93.184" not in refused.value.message


async def test_a_name_that_does_not_resolve_in_time_is_refused() -> None:
    never = asyncio.Event()

    async def hanging(host: str, port: int) -> list[str]:
        await never.wait()
        return ["127.0.0.1"]

    guard = EndpointGuard(DEFAULT, lookup=hanging, resolve_timeout=0.05)
    with pytest.raises(InvalidRequest, match="does not resolve"):
        await guard.check_registration("http://slow.test:9")
    with pytest.raises(InvalidRequest, match="does not resolve"):
        await EndpointGuard(DEFAULT, lookup=NameTable()).check_registration("http://nx.test")


async def test_a_listed_name_may_resolve_anywhere_but_to_a_special_address() -> None:
    allow = EndpointAllow.parse([*DEFAULT_ENDPOINT_ALLOW, "api.partner.test"])
    names = NameTable(api_partner_test=["93.184.215.14"], evil_partner_test=["169.254.169.254"])
    await EndpointGuard(allow, lookup=names).check_registration("https://api.partner.test")
    allow = EndpointAllow.parse(["api.partner.test"])
    names = NameTable(api_partner_test=["169.254.169.254"])
    with pytest.raises(InvalidRequest):
        await EndpointGuard(allow, lookup=names).check_registration("https://api.partner.test")


# checked as the call connects ----------------------------------------------------------------


async def test_the_resolver_hands_aiohttp_only_the_allowed_addresses() -> None:
    names = NameTable(mixed_test=["169.254.169.254", "10.0.0.7", "fd00::7", "8.8.8.8"])
    guard = EndpointGuard(DEFAULT, lookup=names)
    results = await guard.resolver.resolve("mixed.test", 80, socket.AF_UNSPEC)
    assert [(r["host"], r["port"], r["hostname"]) for r in results] == [
        ("10.0.0.7", 80, "mixed.test"),
        ("fd00::7", 80, "mixed.test"),
    ]
    v4 = await guard.resolver.resolve("mixed.test", 80, socket.AF_INET)
    assert [r["host"] for r in v4] == ["10.0.0.7"]


async def test_a_name_rebound_to_a_refused_address_gets_no_address() -> None:
    names = NameTable(rebinding_test=["127.0.0.1"])
    guard = EndpointGuard(DEFAULT, lookup=names)
    await guard.check_registration("http://rebinding.test:8001")  # fine when registered
    names.names["rebinding.test"] = ["169.254.169.254"]  # then the name points elsewhere
    with pytest.raises(AddressRefused):
        await guard.resolver.resolve("rebinding.test", 8001, socket.AF_UNSPEC)
    assert isinstance(AddressRefused("x"), OSError)  # aiohttp reports it as a failed look-up


def test_check_call_refuses_ip_literals_outside_the_allow_list() -> None:
    guard = EndpointGuard(EndpointAllow.parse(["10.0.0.0/8"]), lookup=NameTable())
    assert guard.check_call("http://10.0.0.7:9") is None
    assert guard.check_call("http://127.0.0.1:9") == "address not allowed by endpoint_allow"
    assert guard.check_call("http://169.254.169.254") is not None
    assert guard.check_call("http://user:pw@10.0.0.7:9") is not None  # stored before the rules
    assert guard.check_call("http://pong.test:9") is None  # a name: its resolver decides
