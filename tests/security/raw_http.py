"""Requests sent byte for byte: HTTP clients normalise paths (`..`, `%2e`), which would hide
exactly the requests these tests are about."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send_raw(url: str, data: bytes, timeout: float = 15.0) -> RawAnswer:
    """Send `data` as it is to the server at `url`; read the answer until the server closes."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return RawAnswer(status, headers, body)


def dechunk(data: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 message."""
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


async def request(
    url: str,
    method: str,
    target: str | bytes,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> RawAnswer:
    """One request with `target` exactly as given (bytes allowed: tabs, CRs, anything)."""
    host = urlsplit(url).netloc
    lines = [
        method.encode()
        + b" "
        + (target if isinstance(target, bytes) else target.encode())
        + b" HTTP/1.1",
        b"Host: " + host.encode(),
        b"Connection: close",
    ]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}".encode())
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}".encode())
    return await send_raw(url, b"\r\n".join(lines) + b"\r\n\r\n" + body)


def is_openai_error(answer: RawAnswer) -> bool:
    try:
        error = answer.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return set(error) == {"message", "type", "param", "code"}
