"""Which browsers may talk to the gateway: the Host and Origin rules, and CORS.

A gateway without keys trusts whoever can connect, and a browser on the same machine can
connect on behalf of any web page it shows. So, for every request:

- `Origin` (sent by browsers on every cross-origin request that can change anything) must be
  the gateway's own origin or one listed in `cors.allowed_origins`;
- `Sec-Fetch-Site: cross-site` without an allowed origin is refused too, except a plain
  navigation to an open page (a link to the dashboard);
- without keys, `Host` must name this gateway (a loopback name, an IP address, the listen
  host, or `allowed_hosts`): a DNS-rebinding page reaches 127.0.0.1 under its own name.

Pure: the web layer (`api.guards`) applies it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping

from modelyard.config.schema import GatewayConfig

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def host_name(host_header: str) -> str:
    """The name in a Host header, without port or brackets, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@functools.lru_cache(maxsize=1024)  # asked for every keyless request; bounded for odd Hosts
def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BrowserPolicy:
    def __init__(self, config: GatewayConfig, keyless: bool) -> None:
        self.reconfigure(config, keyless)

    def reconfigure(self, config: GatewayConfig, keyless: bool) -> None:
        """The rules of a (reloaded) config; `keyless`: the gateway has no keys now."""
        self.keyless = keyless
        self.allowed_origins = frozenset(config.cors.allowed_origins)
        self.allowed_hosts = frozenset(
            {host_name(config.host), *(host.lower() for host in config.allowed_hosts)}
        )

    def host_problem(self, host_header: str | None) -> str | None:
        """Why this Host is refused (only without keys), or None."""
        if not self.keyless or host_header is None:
            return None
        name = host_name(host_header)
        if (
            _is_ip(name)
            or name in LOOPBACK_NAMES
            or name.endswith(".localhost")
            or name in self.allowed_hosts
        ):
            return None
        return (
            f"this gateway has no API keys and does not answer to the host name {name[:100]!r}; "
            "add it under allowed_hosts: if it is really this gateway's name"
        )

    def is_listed(self, origin: str) -> bool:
        return origin.lower() in self.allowed_origins

    def origin_problem(
        self, headers: Mapping[str, str], method: str, open_path: bool
    ) -> str | None:
        """Why a browser request from another site is refused, or None."""
        origin = headers.get("Origin")
        if origin is not None:
            if self.is_listed(origin) or _same_origin(origin, headers.get("Host")):
                return None
            return (
                f"requests from the web page at {origin[:100]!r} are not allowed; "
                "list its origin under cors: allowed_origins: to allow it"
            )
        if headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            navigation = headers.get("Sec-Fetch-Mode", "").lower() == "navigate"
            if method in ("GET", "HEAD") and navigation and open_path:
                return None
            return "cross-site requests are not allowed"
        return None


def _same_origin(origin: str, host_header: str | None) -> bool:
    if host_header is None:
        return False
    scheme, sep, rest = origin.lower().partition("://")
    return bool(sep) and scheme in ("http", "https") and rest == host_header.strip().lower()
