"""Which upstream calls go through a proxy: ``NO_PROXY`` rules and loopback, decided per host.

``NO_PROXY`` entries are read as curl, requests and Go read them: ``*`` (no proxy at all), a
domain (``example.com`` or ``.example.com``: the domain and every name under it), an IP address,
a CIDR range (``10.0.0.0/8``), each optionally with ``:port``. Loopback (``localhost``, names
under ``.localhost``, 127.0.0.0/8, ::1) never goes through a proxy, as in Go: a proxy elsewhere
cannot reach this machine's own servers, and the managed backend lives there.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..config import ProxyServer, UpstreamNetwork

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class _Rule:
    domain: str | None = None
    network: Network | None = None
    port: int | None = None

    def matches(self, host: str, address: Address | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address in self.network
        assert self.domain is not None
        return host == self.domain or host.endswith("." + self.domain)


def _rule(entry: str) -> _Rule | None:
    """One ``NO_PROXY`` entry; None for one that matches nothing (a malformed port)."""
    port: int | None = None
    host = entry
    if entry.startswith("["):  # [::1]:8080
        host, _, rest = entry[1:].partition("]")
        if rest.startswith(":"):
            if not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif entry.count(":") == 1:  # host:port (more colons: a bare IPv6 address)
        host, _, number = entry.partition(":")
        if not number.isdigit():
            return None
        port = int(number)
    try:
        return _Rule(network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        domain = host.removeprefix("*").lstrip(".").rstrip(".")
        return _Rule(domain=domain, port=port) if domain else None


class ProxyRules:
    """The proxy for each upstream host and scheme, or None to connect directly."""

    def __init__(self, network: UpstreamNetwork) -> None:
        self.http = network.http_proxy
        self.https = network.https_proxy
        self.everything_direct = "*" in network.no_proxy
        self.rules = [rule for entry in network.no_proxy if (rule := _rule(entry)) is not None]

    def proxy_for(self, scheme: str, host: str, port: int) -> ProxyServer | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.everything_direct:
            return None
        host = host.lower().rstrip(".")
        try:
            address: Address | None = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address is not None and address.is_loopback:
            return None
        if host == "localhost" or host.endswith(".localhost"):
            return None
        if any(rule.matches(host, address, port) for rule in self.rules):
            return None
        return proxy
