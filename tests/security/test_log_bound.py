"""No client can make the gateway write unbounded logs.

A flood of malformed and refused requests (garbage request lines, headers too long with a key
in them, bad paths, bad encodings, no key, wrong keys) from one unauthenticated client:
the gateway's log grows by a bounded amount however many arrive (the audit measured about
1 MiB/s before), and no piece of a key is in it.
"""

from __future__ import annotations

import asyncio
import gzip
import time

from tests.conftest import fake_model
from tests.security.keys import USER_KEY, auth_settings
from tests.security.raw_http import request, send_raw

FLOOD = 1200
BOUND = 6 * 1024  # bytes of log for the whole flood


def malformed(index: int, url: str) -> object:
    kind = index % 8
    if kind == 0:
        return send_raw(url, b"\x16\x03\x01garbage that is not HTTP\r\n\r\n")
    if kind == 1:
        header = f"Authorization: Bearer {USER_KEY}{'A' * 9000}"
        return send_raw(url, f"GET /v1/models HTTP/1.1\r\n{header}\r\n\r\n".encode())
    if kind == 2:
        return send_raw(url, b"GET /v1/models HTTP/1.1\r\nNo colon here\r\n\r\n")
    if kind == 3:
        return send_raw(url, b"POST /v1/x HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort")
    if kind == 4:
        return request(url, "GET", "/upstream/chat/sleep%09\x01")
    if kind == 5:
        return request(url, "POST", "/v1/chat/completions", {"Content-Encoding": "gzip"}, b"zz")
    if kind == 6:
        return request(url, "GET", "/gateway/status", {"Authorization": "Bearer wrong"})
    return request(
        url,
        "POST",
        "/v1/chat/completions",
        {"x-api-key": USER_KEY, "Content-Encoding": "gzip", "Content-Type": "application/json"},
        gzip.compress(b"{}")[:10] + b"\xff" * 20,
    )


async def test_a_flood_of_malformed_requests_writes_a_bounded_log(gateway_factory):
    gateway = gateway_factory({"chat": fake_model("chat")}, **auth_settings())
    before = len(gateway.log_text().encode())
    started = time.monotonic()
    for batch in range(0, FLOOD, 40):
        results = await asyncio.gather(
            *(malformed(index, gateway.url) for index in range(batch, batch + 40)),  # type: ignore[arg-type]
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, Exception)]
        assert not [e for e in errors if not isinstance(e, ConnectionError | OSError)], errors
    elapsed = time.monotonic() - started
    log = gateway.log_text()
    grown = len(log.encode()) - before
    assert grown < BOUND, f"{grown} bytes of log for {FLOOD} requests in {elapsed:.1f}s"
    assert USER_KEY[3:20] not in log
    assert "Traceback" not in log
    assert gateway.process.poll() is None
    # The gateway still serves, and still says what it suppressed.
    answer = await request(gateway.url, "GET", "/health")
    assert answer.status == 200
