"""API keys end to end.

The gateway's decisions (401/403/404/429, what reaches the engine, what the listing shows)
run in-process (tests/harness.py: the real app on a loopback port, an in-process engine for
vLLM's OpenAI server). What only a real process shows stays on `modelyard serve` with
tests/fake_engine.py: counters across a restart, files on disk, the CLI's refusal and the
start message in its log."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import fake_model, free_port
from tests.harness import Harness, engine_model, in_process_gateway
from tests.reliability.running import restart
from tests.security.keys import ADMIN_KEY, LIMITED_KEY, USER_KEY, auth_settings, bearer

CHAT = {"messages": [{"role": "user", "content": "hello"}]}
MODELS = {"chat": "chat", "secret": "secret"}


def models() -> dict[str, Any]:
    return {name: fake_model(served, route=f"/{name}") for name, served in MODELS.items()}


def in_process_models() -> dict[str, Any]:
    return {
        name: engine_model(served_name=served, route=f"/{name}") for name, served in MODELS.items()
    }


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Harness]:
    async with in_process_gateway(tmp_path, in_process_models(), **auth_settings()) as h:
        yield h


@pytest.fixture
def process_gateway(gateway_factory):
    running = gateway_factory(models(), **auth_settings())
    running.admin_key = ADMIN_KEY
    return running


async def call(
    method: str, url: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, Any, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, **kwargs) as response,
    ):
        text = await response.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return response.status, body, dict(response.headers)


def assert_openai_error(body: Any, code: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body


async def test_no_key_and_wrong_key_get_401_and_nothing_starts(gateway):
    url = gateway.url + "/v1/chat/completions"
    status, body, headers = await call("POST", url, json={"model": "chat", **CHAT})
    assert status == 401
    assert_openai_error(body, "missing_api_key")
    assert body["error"]["type"] == "authentication_error"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    wrong = USER_KEY[:-2] + ("aa" if not USER_KEY.endswith("aa") else "bb")
    for headers_sent in (bearer(wrong), {"x-api-key": wrong}, {"Authorization": "Basic Zm9v"}):
        status, body, _ = await call("POST", url, headers_sent, json={"model": "chat", **CHAT})
        assert status == 401
        assert body["error"]["code"] in ("invalid_api_key", "missing_api_key")
        assert wrong not in json.dumps(body)
    # Every route but /health needs a key, even ones that do not exist (no route discovery).
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/gateway/status"),
        ("GET", "/metrics"),
        ("POST", "/admin/models/chat/load"),
        ("GET", "/no/such/route"),
        ("GET", "/upstream/chat/v1/models"),
        ("GET", "/chat/v1/models"),
    ]:
        status, body, _ = await call(method, gateway.url + path)
        assert status == 401, path
    status, body, _ = await call("GET", gateway.url + "/health")
    assert (status, body["status"]) == (200, "ok")
    status, spec, _ = await call("GET", gateway.url + "/openapi.json")
    assert status == 200
    assert spec["openapi"].startswith("3.")
    assert gateway.model_state("chat") == "stopped"
    assert gateway.engine_pids() == []


async def test_user_key_serves_its_models_by_bearer_or_x_api_key(gateway):
    url = gateway.url + "/v1/chat/completions"
    for headers in (bearer(USER_KEY), {"x-api-key": USER_KEY}):
        status, body, _ = await call("POST", url, headers, json={"model": "chat", **CHAT})
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == "chat says: hello"
    # The key never reaches the engine.
    seen_headers = await engine_seen_headers(gateway, "chat")
    assert not {"authorization", "x-api-key"} & {h.lower() for h in seen_headers}
    assert USER_KEY not in json.dumps(seen_headers)


async def engine_seen_headers(gateway, model: str) -> dict[str, str]:
    status, body, _ = await call(
        "GET", gateway.url + f"/upstream/{model}/fake/seen", bearer(ADMIN_KEY)
    )
    assert status == 200, body
    return dict(body["last"]["headers"])


async def test_key_without_the_model_gets_404_and_the_model_is_not_started(gateway):
    # A model the key may not use answers exactly like one that does not exist (the same
    # status, code and list of usable models), so a scoped key cannot probe names.
    for method, path, payload, code in [
        ("POST", "/v1/chat/completions", {"model": "secret", **CHAT}, "model_not_found"),
        ("POST", "/secret/v1/chat/completions", {"model": "secret", **CHAT}, "route_not_found"),
        (
            "POST",
            "/upstream/secret/v1/chat/completions",
            {"model": "secret", **CHAT},
            "model_not_found",
        ),
        ("GET", "/secret/v1/models", None, "route_not_found"),
        ("GET", "/v1/models/secret", None, "model_not_found"),
    ]:
        status, body, _ = await call(method, gateway.url + path, bearer(USER_KEY), json=payload)
        assert status == 404, (path, body)
        assert_openai_error(body, code)
        unknown = path.replace("secret", "nosuch")
        payload = payload and {**payload, "model": "nosuch"}
        status, other, _ = await call(method, gateway.url + unknown, bearer(USER_KEY), json=payload)
        assert status == 404
        assert other["error"]["message"] == body["error"]["message"].replace("secret", "nosuch")
    assert gateway.model_state("secret") == "stopped"
    assert gateway.status()["models"][1]["starts"] == 0
    assert gateway.engine_pids() == []


async def test_models_listing_shows_only_what_the_key_may_use(gateway):
    _, body, _ = await call("GET", gateway.url + "/v1/models", bearer(USER_KEY))
    assert [entry["id"] for entry in body["data"]] == ["chat"]
    _, body, _ = await call("GET", gateway.url + "/v1/models", bearer(ADMIN_KEY))
    assert [entry["id"] for entry in body["data"]] == ["chat", "secret"]
    # An unknown name's error lists only the usable names, not other keys' models.
    status, body, _ = await call(
        "POST", gateway.url + "/v1/chat/completions", bearer(USER_KEY), json={"model": "x"}
    )
    assert status == 404
    assert "secret" not in body["error"]["message"]


async def test_admin_routes_need_an_admin_key(gateway):
    for method, path in [
        ("GET", "/gateway/status"),
        ("POST", "/admin/models/chat/load"),
        ("POST", "/admin/models/chat/unload"),
        ("POST", "/admin/models/chat/sleep"),
        ("GET", "/admin/logs/chat"),
        ("GET", "/admin/events?follow=0"),
        ("GET", "/admin/keys"),
        ("GET", "/metrics"),
    ]:
        status, body, _ = await call(method, gateway.url + path, bearer(USER_KEY))
        assert status == 403, path
        assert_openai_error(body, "admin_required")
    assert gateway.model_state("chat") == "stopped"
    status, body, _ = await call("POST", gateway.url + "/admin/models/chat/load", bearer(ADMIN_KEY))
    assert (status, body["state"]) == (200, "ready")
    # Admin actions are events that carry the key's name (never the key).
    _, body, _ = await call("GET", gateway.url + "/admin/events?follow=0", bearer(ADMIN_KEY))
    actions = [e for e in body["events"] if e["kind"] == "admin_action"]
    assert actions
    assert actions[-1]["data"]["key"] == "ops"
    assert ADMIN_KEY not in json.dumps(body)


async def test_engine_control_endpoints_need_an_admin_key(gateway):
    await call("POST", gateway.url + "/admin/models/chat/load", bearer(ADMIN_KEY))
    for method, path, payload in [
        ("POST", "/chat/sleep?level=1", None),
        ("POST", "/upstream/chat/wake_up", None),
        ("POST", "/upstream/chat/v1/../sleep", None),
        ("POST", "/chat/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}),
        (
            "POST",
            "/v1/load_lora_adapter",
            {"model": "chat", "lora_name": "x", "lora_path": "/etc"},
        ),
    ]:
        status, body, _ = await call(method, gateway.url + path, bearer(USER_KEY), json=payload)
        assert status == 403, (path, body)
        assert_openai_error(body, "admin_required")
    assert gateway.model_state("chat") == "ready"


async def test_rate_limit_gives_429_with_retry_after(gateway):
    url = gateway.url + "/v1/chat/completions"
    statuses = []
    for _ in range(5):
        status, body, headers = await call(
            "POST", url, bearer(LIMITED_KEY), json={"model": "chat", **CHAT}
        )
        statuses.append(status)
    assert statuses == [200, 200, 200, 429, 429]
    assert_openai_error(body, "rate_limit_exceeded")
    assert body["error"]["type"] == "rate_limit_error"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "3"
    # Other keys are not affected.
    status, _, _ = await call("POST", url, bearer(USER_KEY), json={"model": "chat", **CHAT})
    assert status == 200


async def test_usage_counters_survive_a_restart(gateway_factory, tmp_path):
    gateway = gateway_factory(models(), **auth_settings())
    gateway.admin_key = ADMIN_KEY
    url = gateway.url + "/v1/chat/completions"
    for _ in range(4):
        await call("POST", url, bearer(USER_KEY), json={"model": "chat", **CHAT})
    await call("POST", url, bearer(USER_KEY), json={"model": "secret", **CHAT})  # 403
    before = await key_usage(gateway, "alice")
    assert (before["requests"], before["forbidden"]) == (5, 1)
    gateway.stop()
    # A second gateway on the same config and state directory.
    again = restart(gateway)
    try:
        after = await key_usage(again, "alice")
        assert after["requests"] == before["requests"]  # the key_usage call itself counts for ops
        assert after["forbidden"] == 1
    finally:
        again.stop()


async def key_usage(gateway, name: str) -> dict[str, Any]:
    status, body, _ = await call("GET", gateway.url + "/admin/keys", bearer(ADMIN_KEY))
    assert status == 200, body
    assert "sha256" not in json.dumps(body)
    return next(k["usage"] for k in body["keys"] if k["name"] == name)


async def test_keys_never_reach_logs_events_or_state(process_gateway):
    gateway = process_gateway
    url = gateway.url + "/v1/chat/completions"
    await call("POST", url, bearer(USER_KEY), json={"model": "chat", **CHAT})
    await call("POST", url, bearer(USER_KEY), json={"model": "secret", **CHAT})
    await call("POST", url, bearer(USER_KEY + "x"), json={"model": "chat", **CHAT})
    await call("POST", url, {"x-api-key": ADMIN_KEY}, json={"model": "chat", "fake_status": 500})
    await call("POST", gateway.url + "/admin/models/secret/load", bearer(ADMIN_KEY))
    await call("POST", gateway.url + "/admin/models/chat/unload", bearer(ADMIN_KEY))
    for _ in range(5):
        await call("POST", url, bearer(LIMITED_KEY), json={"model": "chat", **CHAT})
    gateway.stop()  # flushes usage counters, closes the event store and engine logs
    files = [p for p in gateway.state_dir.rglob("*") if p.is_file()]
    assert any(p.name == "gateway.out" for p in files)
    assert any(p.suffix == ".log" for p in files)  # engine logs
    assert any(p.name.startswith("events") for p in files)
    for path in files:
        data = path.read_bytes()
        for key in (ADMIN_KEY, USER_KEY, LIMITED_KEY):
            assert key.encode() not in data, f"a key was written to {path}"
            assert key[3:20].encode() not in data, f"part of a key was written to {path}"


def test_no_keys_refuses_a_non_loopback_address(tmp_path: Path):
    config = tmp_path / "modelyard.yaml"
    config.write_text(
        yaml.safe_dump({"listen": f"0.0.0.0:{free_port()}", "state_dir": str(tmp_path / "state")})
    )
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "modelyard keys create" in result.stderr


def test_start_message_says_which_auth_mode(gateway_factory):
    gateway = gateway_factory({})
    assert "auth: none (no API keys configured; listening on loopback only)" in gateway.log_text()
    keyed = gateway_factory({}, **auth_settings())
    assert "auth: 3 API key(s), 1 admin" in keyed.log_text()
    open_gateway = gateway_factory(
        {}, listen=f"0.0.0.0:{free_port()}", auth={"allow_unauthenticated": True}
    )
    assert "auth: NONE on 0.0.0.0" in open_gateway.log_text()
