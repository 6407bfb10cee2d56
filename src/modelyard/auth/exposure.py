"""No keys means loopback only: a gateway with no API keys must not listen on the network."""

from __future__ import annotations

import ipaddress
import socket

from modelyard.config.schema import GatewayConfig


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(address).split("%", 1)[0]).is_loopback for address in addresses
    )


def exposure_problem(config: GatewayConfig) -> str | None:
    """Why the gateway must not start with this config, or None."""
    if config.auth.keys or config.auth.allow_unauthenticated or is_loopback(config.host):
        return None
    return (
        f"refusing to listen on {config.listen} with no API keys: anyone who can reach it could "
        "start models on your GPUs. Create a key with `modelyard keys create NAME --admin` and "
        "add it under auth: keys:, listen on 127.0.0.1, or set auth: allow_unauthenticated: "
        "true if the network in front is trusted."
    )


def auth_mode(config: GatewayConfig) -> str:
    """One line for the start-up message: which access mode the gateway is in."""
    keys = config.auth.keys
    if keys:
        admins = sum(1 for key in keys if key.admin)
        return f"auth: {len(keys)} API key(s), {admins} admin; requests without a key get 401"
    if is_loopback(config.host):
        return "auth: none (no API keys configured; listening on loopback only)"
    return (
        f"auth: NONE on {config.listen} (allow_unauthenticated: true): "
        "anyone who can reach this address may use every model and admin route"
    )


def open_route_warnings(config: GatewayConfig) -> list[str]:
    """One loud line per route served without a key (`open_route: true`)."""
    if not (config.auth.keys or config.auth.allow_unauthenticated):
        return []  # no keys at all: everything is open on loopback anyway, said above
    return [
        f"auth: route {model.route} is OPEN (open_route: true): anyone who can reach "
        f"{config.listen} may use model {name!r} through {model.route}/... without an API key"
        for name, model in config.models.items()
        if model.open_route and model.route
    ]
