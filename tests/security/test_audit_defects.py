"""The defects an outside audit found (issue 12), each reproduced: every test here failed on
the gateway as it was before the fix.

The test engine stands for vLLM: it has `/sleep` (with --sleep-mode), `/v1/load_lora_adapter`
and records exactly what it received (`/fake/received`), decoding request lines as uvicorn
does. The gateway's decisions run in-process (tests/harness.py serves the app as `modelyard
serve` does; its engines have the same `/sleep`, LoRA endpoints and wiretap, as aiohttp servers
like tests/fake_engine.py). What reaches the log or files on disk stays on a real process.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import fake_model
from tests.harness import Behaviour, Harness, engine_model, in_process_gateway
from tests.lora.test_lora_gateway import lora_model, write_adapter
from tests.security.keys import ADMIN_KEY, USER_KEY, auth_settings, bearer, key_config
from tests.security.raw_http import is_openai_error, request, send_raw

CHAT = {"messages": [{"role": "user", "content": "hello"}]}
OPEN_KEY = "my-" + "o" * 43  # a user key for every model, not an admin


def json_headers(key: str) -> dict[str, str]:
    return {**bearer(key), "Content-Type": "application/json"}


async def received(gateway: Any, model: str) -> list[dict[str, Any]]:
    """Everything the model's engine received, as it received it."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{gateway.url}/upstream/{model}/fake/received", headers=bearer(ADMIN_KEY)
        ) as response,
    ):
        assert response.status == 200
        result: list[dict[str, Any]] = await response.json()
        return result


async def load(gateway: Any, model: str) -> None:
    answer = await request(gateway.url, "POST", f"/admin/models/{model}/load", bearer(ADMIN_KEY))
    assert answer.status == 200, answer.body


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[Harness]:
    models = {
        "chat": engine_model(served_name="chat", route="/chat"),
        "secret": engine_model(served_name="secret", route="/secret"),
    }
    behaviours = {"chat": Behaviour(sleep_mode=True)}  # vLLM with --enable-sleep-mode
    async with in_process_gateway(tmp_path, models, behaviours, **auth_settings()) as h:
        yield h


@pytest.fixture
def keyed_process(gateway_factory):
    running = gateway_factory(
        {
            "chat": fake_model("chat", "--sleep-mode", route="/chat"),
            "secret": fake_model("secret", route="/secret"),
        },
        **auth_settings(),
    )
    running.admin_key = ADMIN_KEY
    return running


# 1. Engine control endpoints through characters the forwarded URL loses or reinterprets.
async def test_1_control_endpoints_are_not_reachable_through_encodings(keyed):
    await load(keyed, "chat")
    targets = [
        "/upstream/chat/sleep%23",  # '#' decoded: the URL sent on would drop it as a fragment
        "/upstream/chat/sleep%09",  # a tab: stripped by URL parsing
        "/upstream/chat/sleep%0d",  # a CR
        "/upstream/chat/sleep%0a",
        "/upstream/chat/sleep%20",
        "/chat/sleep%23x",
        "/chat/wake_up%09",
        "/upstream/chat/v1/%2e%2e/sleep",
        "/upstream/chat/v1/../sleep",
        "/upstream/chat//sleep",
        "/upstream/chat/./sleep",
        "/upstream/chat/sleep?level=1#",
        "/upstream/chat/sle%65p%23",
        "/upstream/chat/v1/load_lora_adapter%23",
        "/v1/load_lora_adapter%09",
    ]
    body = json.dumps({"model": "chat", "lora_name": "x", "lora_path": "/etc"}).encode()
    for target in targets:
        answer = await request(keyed.url, "POST", target, json_headers(USER_KEY), body)
        assert answer.status in (400, 403, 404), (target, answer)
        assert is_openai_error(answer), (target, answer.body)
    seen = await received(keyed, "chat")
    reached = [entry["path"] for entry in seen if entry["path"] != "/health"]
    assert not [p for p in reached if "sleep" in p or "wake" in p or "lora" in p], reached
    assert keyed.model_state("chat") == "ready"


# 2. An adapter-scoped key reaching its base model or a sibling adapter via /upstream/<adapter>.
async def test_2_adapter_scoped_key_reaches_only_its_adapter(tmp_path):
    adapters = tmp_path / "adapters"
    write_adapter(adapters / "sql-adapter")
    write_adapter(adapters / "email-adapter")
    sql_key = "my-" + "s" * 43
    settings = auth_settings()
    settings["auth"]["keys"].append(key_config("sql", sql_key, models=["sql-adapter"]))
    async with in_process_gateway(tmp_path, {"base": lora_model(adapters)}, **settings) as h:
        await _adapter_scoped_key(h, sql_key)


async def _adapter_scoped_key(gateway: Harness, sql_key: str) -> None:
    url = gateway.url + "/upstream/sql-adapter/v1/chat/completions"
    for named in ("base", "email-adapter", "/models/SmolLM2-135M-Instruct"):
        body = json.dumps({"model": named, **CHAT}).encode()
        answer = await request(
            gateway.url, "POST", url.split(gateway.url)[1], json_headers(sql_key), body
        )
        assert answer.status in (400, 404), (named, answer)
        assert is_openai_error(answer)
        assert answer.json()["error"]["message"].endswith("known models: sql-adapter")
    # Without a model, the engine gets the adapter's name (vLLM would serve its base model).
    answer = await request(
        gateway.url,
        "POST",
        "/upstream/sql-adapter/v1/chat/completions",
        json_headers(sql_key),
        json.dumps(CHAT).encode(),
    )
    assert answer.status == 200, answer
    # Its own adapter, named in the body or not, is served.
    answer = await request(
        gateway.url,
        "POST",
        "/upstream/sql-adapter/v1/chat/completions",
        json_headers(sql_key),
        json.dumps({"model": "sql-adapter", **CHAT}).encode(),
    )
    assert answer.status == 200, answer
    # The engine's own model list would name the base and every loaded sibling adapter.
    listing = await request(gateway.url, "GET", "/upstream/sql-adapter/v1/models", bearer(sql_key))
    assert [entry["id"] for entry in listing.json()["data"]] == ["sql-adapter"]
    models_served = {
        json.loads(entry["body"]).get("model")
        for entry in await received(gateway, "base")
        if entry["path"] == "/v1/chat/completions"
    }
    assert models_served == {"sql-adapter"}


# 3. A secret from ${env:} in a model's args shown to users in 502s, logs, events and status.
async def test_3_env_secret_in_args_never_shown(gateway_factory, monkeypatch):
    canary = "canary-3f9c2a7e51d04b"
    monkeypatch.setenv("MODEL_TOKEN", canary)
    settings = auth_settings()
    settings["auth"]["keys"].append(key_config("everyone", OPEN_KEY, models=["*"]))
    gateway = gateway_factory(
        {
            "broken": fake_model(
                "broken", "--crash-on-start", "3", args=["--token", "${env:MODEL_TOKEN}"]
            )
        },
        **settings,
    )
    gateway.admin_key = ADMIN_KEY
    body = json.dumps({"model": "broken", **CHAT}).encode()
    user = await request(gateway.url, "POST", "/v1/chat/completions", json_headers(OPEN_KEY), body)
    assert user.status in (502, 503), user
    assert canary.encode() not in user.body
    assert b"starting:" not in user.body  # no engine log lines for a user at all
    admin = await request(
        gateway.url, "POST", "/v1/chat/completions", json_headers(ADMIN_KEY), body
    )
    assert admin.status in (502, 503), admin
    assert canary.encode() not in admin.body
    for path in ("/gateway/status", "/admin/events?follow=0", "/admin/logs/broken", "/metrics"):
        answer = await request(gateway.url, "GET", path, bearer(ADMIN_KEY))
        assert answer.status == 200, path
        assert canary.encode() not in answer.body, path
    logs = await request(gateway.url, "GET", "/admin/logs/broken", bearer(ADMIN_KEY))
    assert b"[redacted]" in logs.body  # the engine printed it; the gateway masked it
    gateway.stop()
    for path in gateway.state_dir.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path


# 4. A key sent as `api-key` (Continue sends it beside Authorization) forwarded to the engine.
async def test_4_no_credential_header_reaches_the_engine(keyed):
    headers = {
        **json_headers(USER_KEY),
        "api-key": USER_KEY,
        "X-Goog-Api-Key": USER_KEY,
        "Proxy-Authorization": f"Basic {USER_KEY}",
        "Cookie": f"session={USER_KEY}",
        "X-Custom-Token": USER_KEY,
    }
    body = json.dumps({"model": "chat", **CHAT}).encode()
    for target in ("/v1/chat/completions", "/chat/v1/chat/completions"):
        answer = await request(keyed.url, "POST", target, headers, body)
        assert answer.status == 200, answer
    for entry in await received(keyed, "chat"):
        assert USER_KEY not in json.dumps(entry), entry["headers"]
        assert USER_KEY[3:20] not in json.dumps(entry)


# 5. Without a key, a path under an open prefix that climbs out reached the router.
async def test_5_open_prefix_cannot_be_climbed_out_of(keyed):
    for target in ("/ui/../v1/models", "/ui/../x", "/ui/%2e%2e/gateway/status", "/ui/..%2fx"):
        answer = await request(keyed.url, "GET", target)
        assert answer.status in (400, 401), (target, answer)
        assert is_openai_error(answer)
        assert b"/chat" not in answer.body
        assert b"routes" not in answer.body


# 6. A body with an invalid Content-Encoding gave 500 and a traceback.
async def test_6_invalid_content_encoding_is_a_400(keyed_process):
    keyed = keyed_process  # process-level: what `modelyard serve` writes to its log
    body = json.dumps({"model": "chat", **CHAT}).encode()
    for encoding, data in [
        ("gzip", b"not gzip at all"),
        ("deflate", b"\x00\x01garbage"),
        ("gzip", gzip.compress(body)[:12] + b"\xff" * 40),  # a valid header, then garbage
    ]:
        headers = {**json_headers(USER_KEY), "Content-Encoding": encoding}
        answer = await request(keyed.url, "POST", "/v1/chat/completions", headers, data)
        assert answer.status == 400, (encoding, answer)
        assert is_openai_error(answer)
    assert "Traceback" not in keyed.log_text()
    assert "internal error" not in keyed.log_text()


# 7. Malformed requests grew the log by about 1 MiB/s; an oversized Authorization was logged.
async def test_7_malformed_requests_cannot_flood_the_log(keyed_process):
    keyed = keyed_process  # process-level: the log `modelyard serve` writes
    before = len(keyed.log_text())
    long_key = USER_KEY + "A" * 9000
    for index in range(200):
        kind = index % 4
        if kind == 0:
            data = b"GARBAGE\x00\x01 / HTTP/1.1\r\n\r\n"
        elif kind == 1:
            data = f"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {long_key}\r\n\r\n".encode()
        elif kind == 2:
            data = b"GET /v1/models HTTP/1.1\r\nBad Header\r\n\r\n"
        else:
            data = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n"
        answer = await send_raw(keyed.url, data)
        assert answer.status == 400 or answer.status == 0, answer
        if answer.status == 400 and answer.body:
            assert is_openai_error(answer), answer.body  # the minor item: OpenAI's shape
            assert USER_KEY[3:20].encode() not in answer.body
    grown = len(keyed.log_text()) - before
    assert grown < 4000, f"the log grew by {grown} bytes for 200 malformed requests"
    assert USER_KEY[3:20] not in keyed.log_text()
    assert "Traceback" not in keyed.log_text()


# 8. A gateway without keys obeyed cross-site requests (see also test_cross_site.py).
async def test_8_keyless_gateway_refuses_cross_site_requests(tmp_path):
    async with in_process_gateway(tmp_path, {"chat": engine_model(served_name="chat")}) as h:
        await _keyless_cross_site(h)


async def _keyless_cross_site(gateway: Harness) -> None:
    evil = {"Origin": "http://evil.example"}
    answer = await request(gateway.url, "POST", "/admin/models/chat/load", evil)
    assert answer.status == 403
    assert is_openai_error(answer)
    simple = {"Content-Type": "text/plain"}
    body = json.dumps({"model": "chat", **CHAT}).encode()
    answer = await request(gateway.url, "POST", "/v1/chat/completions", simple, body)
    assert answer.status == 415
    assert is_openai_error(answer)
    rebinding = await send_raw(
        gateway.url,
        b"GET /gateway/status HTTP/1.1\r\nHost: attacker.example:8000\r\nConnection: close\r\n\r\n",
    )
    assert rebinding.status == 421
    assert b"models" not in rebinding.body
    assert gateway.model_state("chat") == "stopped"
