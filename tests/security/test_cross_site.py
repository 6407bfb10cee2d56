"""Browsers: a web page the user visits must not be able to use the gateway (issue 12).

A keyless gateway on loopback trusts whoever connects, and the user's own browser connects
on behalf of any page. Requests are sent byte for byte, as browsers send them: with `Origin`
on cross-origin requests, `Sec-Fetch-*` headers, and "simple" requests (text/plain or form
bodies, no preflight).

Every check here is the gateway's own HTTP decision, so it runs in-process (tests/harness.py):
the real app on a real loopback port (raw sockets reach it as they reach `modelyard serve`),
with an in-process engine standing in for vLLM's OpenAI server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelyard.config.loader import ConfigError, parse_config
from tests.harness import Harness, engine_model, in_process_gateway
from tests.security.keys import ADMIN_KEY, USER_KEY, auth_settings, bearer
from tests.security.raw_http import is_openai_error, request, send_raw

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
WEBUI = "http://localhost:3000"  # Open WebUI's direct connections, listed in the config
EVIL = "https://evil.example"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def keyless(tmp_path: Path) -> AsyncIterator[Harness]:
    models = {"chat": engine_model()}
    async with in_process_gateway(tmp_path, models, cors={"allowed_origins": [WEBUI]}) as h:
        yield h


async def test_foreign_origins_are_refused_before_anything_runs(keyless):
    body = json.dumps(CHAT).encode()
    for method, target, headers, data in [
        ("POST", "/v1/chat/completions", {**JSON, "Origin": EVIL}, body),
        ("POST", "/admin/models/chat/load", {"Origin": EVIL}, b""),  # body-less: no preflight
        ("GET", "/gateway/status", {"Origin": EVIL}, b""),
        ("GET", "/upstream/chat/v1/models", {"Origin": "null"}, b""),  # sandboxed frames
        ("POST", "/v1/chat/completions", {**JSON, "Origin": "http://127.0.0.1.evil.example"}, body),
    ]:
        answer = await request(keyless.url, method, target, headers, data)
        assert answer.status == 403, (target, answer)
        assert is_openai_error(answer)
        assert answer.json()["error"]["code"] == "cross_origin_forbidden"
        assert "access-control-allow-origin" not in answer.headers
    assert keyless.model_state("chat") == "stopped"


async def test_cross_site_requests_without_origin_are_refused_except_navigation(keyless):
    # <img src=...> or a no-cors fetch: no Origin on GET, but Sec-Fetch-Site says cross-site.
    fetch = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    answer = await request(keyless.url, "GET", "/upstream/chat/v1/models", fetch)
    assert answer.status == 403
    assert keyless.model_state("chat") == "stopped"
    # A link to the dashboard from another site still opens it.
    navigate = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    answer = await request(keyless.url, "GET", "/ui/", navigate)
    assert answer.status == 200


async def test_simple_requests_to_json_routes_are_refused(keyless):
    body = json.dumps(CHAT).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        answer = await request(
            keyless.url, "POST", "/v1/chat/completions", {"Content-Type": content_type}, body
        )
        assert answer.status == 415, (content_type, answer)
        assert is_openai_error(answer)
    answer = await request(keyless.url, "POST", "/v1/chat/completions", {}, body)  # no type
    assert answer.status == 415
    assert keyless.model_state("chat") == "stopped"
    answer = await request(keyless.url, "POST", "/v1/chat/completions", JSON, body)
    assert answer.status == 200


async def test_a_foreign_host_name_is_refused_without_keys(keyless):
    """DNS rebinding: the attacker's name resolves to 127.0.0.1; the Host header still says
    the attacker's name."""
    port = keyless.url.rsplit(":", 1)[1]
    for host, status in [
        (f"attacker.example:{port}", 421),
        ("attacker.example", 421),
        (f"localhost:{port}", 200),
        (f"127.0.0.1:{port}", 200),
        (f"[::1]:{port}", 200),
        (f"app.localhost:{port}", 200),
    ]:
        data = f"GET /gateway/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        answer = await send_raw(keyless.url, data.encode())
        assert answer.status == status, (host, answer)
        if status == 421:
            assert is_openai_error(answer)
            assert b'"models"' not in answer.body


async def test_same_origin_requests_work(keyless):
    answer = await request(keyless.url, "GET", "/gateway/status", {"Origin": keyless.url})
    assert answer.status == 200


async def test_cors_preflight_only_for_listed_origins_and_never_a_wildcard(keyless):
    preflight = {
        "Origin": WEBUI,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    answer = await request(keyless.url, "OPTIONS", "/v1/chat/completions", preflight)
    assert answer.status == 204
    assert answer.headers["access-control-allow-origin"] == WEBUI
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in answer.headers
    assert answer.headers["vary"] == "Origin"
    # The real request from that origin gets its answer, marked for the browser.
    body = json.dumps(CHAT).encode()
    answer = await request(
        keyless.url, "POST", "/v1/chat/completions", {**JSON, "Origin": WEBUI}, body
    )
    assert answer.status == 200
    assert answer.headers["access-control-allow-origin"] == WEBUI
    # Streams too (the header is set before the first chunk).
    stream = json.dumps({**CHAT, "stream": True}).encode()
    answer = await request(
        keyless.url, "POST", "/v1/chat/completions", {**JSON, "Origin": WEBUI}, stream
    )
    assert answer.status == 200
    assert answer.headers["access-control-allow-origin"] == WEBUI
    # An origin that is not listed gets no preflight answer.
    answer = await request(
        keyless.url, "OPTIONS", "/v1/chat/completions", {**preflight, "Origin": EVIL}
    )
    assert answer.status == 403
    assert "access-control-allow-origin" not in answer.headers


async def test_no_origin_is_allowed_by_default_and_keys_do_not_change_that(tmp_path):
    async with in_process_gateway(tmp_path, {"chat": engine_model()}, **auth_settings()) as h:
        await _no_origin_by_default(h)


async def _no_origin_by_default(gateway: Harness) -> None:
    preflight = {"Origin": WEBUI, "Access-Control-Request-Method": "POST"}
    answer = await request(gateway.url, "OPTIONS", "/v1/chat/completions", preflight)
    assert answer.status == 403
    body = json.dumps(CHAT).encode()
    answer = await request(
        gateway.url,
        "POST",
        "/v1/chat/completions",
        {**JSON, **bearer(USER_KEY), "Origin": EVIL},
        body,
    )
    assert answer.status == 403
    # With keys, the Host header is not checked (LAN and tailnet names vary); keys guard it.
    data = (
        "GET /gateway/status HTTP/1.1\r\nHost: gpu-box.tailnet.example\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\nConnection: close\r\n\r\n"
    )
    answer = await send_raw(gateway.url, data.encode())
    assert answer.status == 200


@pytest.mark.parametrize("origin", ["*", "https://*.example.org", "null", "https://a.org/path"])
def test_config_refuses_wildcards_and_non_origins(origin):
    with pytest.raises(ConfigError, match=r"cors\.allowed_origins"):
        parse_config({"cors": {"allowed_origins": [origin]}})
