"""Reaching a gateway's front door over plain TCP, over TLS, or with proxy workers sharing the
port, for the tests that run the same requests every way (differential, fuzz, the attacks):
one server and one pipeline of rules serve them all, so every answer must be the same."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path
from typing import Any

from tests.deploy.certs import TestCA

# "workers": two proxy workers beside the gateway's process, each taking a share of the
# connections (SO_REUSEPORT), their requests decided by the gateway's process.
DOORS = ["plain", "tls", "workers"]


def tls_settings(folder: Path) -> dict[str, Any]:
    """Config settings for a gateway serving HTTPS with a certificate of a throwaway CA."""
    ca = TestCA.create(folder / "ca")
    cert, key = ca.issue("server")
    return {"tls": {"cert": str(cert), "key": str(key)}}


def door_settings(door: str, folder: Path) -> dict[str, Any]:
    if door == "workers":
        return {"proxy_workers": 2}
    return tls_settings(folder) if door == "tls" else {}


def _context() -> ssl.SSLContext:
    # The tests check the front door's answers, not the certificate (tests/deploy does that).
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def open_socket(url: str, tls: bool, timeout: float = 30.0) -> socket.socket:
    """A connected socket to the gateway at `url` (http://host:port), wrapped in TLS if asked."""
    host, port = url.split("://", 1)[1].split(":")
    raw = socket.create_connection((host, int(port)), timeout=timeout)
    if not tls:
        return raw
    return _context().wrap_socket(raw, server_hostname="localhost")


def http_connection(url: str, tls: bool, timeout: float = 30.0) -> http.client.HTTPConnection:
    host = url.split("://", 1)[1]
    if tls:
        return http.client.HTTPSConnection(host, timeout=timeout, context=_context())
    return http.client.HTTPConnection(host, timeout=timeout)


def https_url(url: str, tls: bool) -> str:
    return url.replace("http://", "https://", 1) if tls else url
