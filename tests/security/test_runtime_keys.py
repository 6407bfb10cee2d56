"""Runtime API keys (LiteLLM's virtual keys for seed 001's users), end to end.

A real `modelyard serve` with the test engine behind it, the `modelyard keys` CLI and the
official `openai` SDK as the client. The test engine reports usage as vLLM does: 5 prompt
tokens, one completion token per word (3 for "chat says: hello"), and for a stream one per
chunk in a last usage-only chunk when `stream_options.include_usage` is set.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import openai
import pytest

from tests.conftest import fake_model
from tests.reliability.running import restart
from tests.security.keys import ADMIN_KEY, USER_KEY, key_config
from tests.security.test_auth_gateway import assert_openai_error, call

CHAT = [{"role": "user", "content": "hello"}]
PLAIN_TOKENS = 5 + 3  # prompt + "chat says: hello"
STREAM_TOKENS = 5 + 5  # prompt + 5 chunks


@pytest.fixture
def gateway(gateway_factory):
    running = gateway_factory(
        {"chat": fake_model("chat"), "other": fake_model("other")},
        auth={
            "keys": [
                key_config("ops", ADMIN_KEY, admin=True),
                key_config("alice", USER_KEY, models=["chat"]),
            ]
        },
    )
    running.admin_key = ADMIN_KEY
    return running


def keys_cli(gateway, *args: str) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", "keys", *args, "--url", gateway.url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"MODELYARD_API_KEY": ADMIN_KEY, "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def client(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def plain(sdk: openai.OpenAI, model: str = "chat") -> Any:
    return sdk.chat.completions.create(model=model, messages=CHAT)  # type: ignore[arg-type]


def streamed(sdk: openai.OpenAI) -> list[Any]:
    stream = sdk.chat.completions.create(
        model="chat",
        messages=CHAT,  # type: ignore[arg-type]
        stream=True,
        extra_body={"fake_chunks": 5},
    )
    return list(stream)


async def key_entry(gateway, name: str) -> dict[str, Any]:
    status, body, _ = await call(
        "GET", gateway.url + "/admin/keys", {"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert status == 200, body
    return next(k for k in body["keys"] if k["name"] == name)


@pytest.mark.slow
async def test_token_budget_counts_streams_and_plain_answers_and_survives_a_restart(gateway):
    made = keys_cli(gateway, "create", "bob", "--models", "chat", "--budget", "30")
    secret = made["key"]
    assert made["source"] == "runtime"
    assert made["budget"] == {
        "tokens": 30,
        "period": "total",
        "spent": 0,
        "remaining": 30,
        "resets_at": None,
    }
    sdk = client(gateway, secret)
    assert plain(sdk).usage.total_tokens == PLAIN_TOKENS
    chunks = streamed(sdk)
    # The client did not ask for usage, so it gets no usage chunk: the gateway asked for it.
    assert all(chunk.usage is None for chunk in chunks)
    plain(sdk)
    streamed(sdk)  # 36 tokens spent now: over the budget, but it started within it
    with pytest.raises(openai.RateLimitError) as refused:
        plain(sdk)
    error = refused.value.body
    assert error["code"] == "budget_exceeded"
    assert "36 of 30 tokens" in error["message"]
    entry = await key_entry(gateway, "bob")
    assert entry["budget"]["spent"] == 2 * PLAIN_TOKENS + 2 * STREAM_TOKENS
    assert entry["usage"]["models"]["chat"] == {
        "requests": 4,
        "prompt_tokens": 20,
        "completion_tokens": 2 * 3 + 2 * 5,
    }
    # Another key is not affected.
    assert plain(client(gateway, USER_KEY)).choices[0].message.content == "chat says: hello"

    gateway.stop()
    again = restart(gateway)
    try:
        with pytest.raises(openai.RateLimitError):
            plain(client(again, secret))
        after = await key_entry(again, "bob")
        assert after["usage"]["models"]["chat"] == entry["usage"]["models"]["chat"]
        metrics = (await call("GET", again.url + "/metrics", _admin()))[1]
        assert 'modelyard_key_prompt_tokens_total{key="bob",model="chat"} 20.0' in metrics
        assert 'modelyard_key_completion_tokens_total{key="bob",model="chat"} 16.0' in metrics
        assert 'modelyard_key_budget_remaining_tokens{key="bob",period="total"} 0.0' in metrics
        # Raising the budget takes effect at once.
        changed = keys_cli(again, "change", "bob", "--budget", "100")
        assert changed["budget"]["remaining"] == 100 - 36
        assert plain(client(again, secret)).choices[0].message.content == "chat says: hello"
    finally:
        again.stop()


@pytest.mark.slow
async def test_tokens_per_minute_limit_with_retry_after_across_a_restart(gateway):
    secret = keys_cli(gateway, "create", "tpm-bot", "--tpm", "15")["key"]
    sdk = client(gateway, secret)
    streamed(sdk)  # 10 tokens
    plain(sdk)  # 18: started under the limit
    with pytest.raises(openai.RateLimitError) as refused:
        streamed(sdk)
    response = refused.value.response
    assert refused.value.body["code"] == "rate_limit_exceeded"
    assert "15 tokens per minute" in refused.value.body["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["x-ratelimit-limit-tokens"] == "15"
    gateway.stop()
    again = restart(gateway)
    try:
        with pytest.raises(openai.RateLimitError):
            plain(client(again, secret))  # the last minute's tokens were saved
    finally:
        again.stop()


async def test_models_expiry_and_revocation_take_effect_on_the_next_request(gateway):
    secret = keys_cli(gateway, "create", "carol", "--models", "chat")["key"]
    sdk = client(gateway, secret)
    plain(sdk)
    with pytest.raises(openai.NotFoundError):  # as if it did not exist
        plain(sdk, "other")  # not in the key's models
    assert [m.id for m in sdk.models.list()] == ["chat"]
    revoked = keys_cli(gateway, "revoke", "carol")
    assert revoked["revoked"] is True
    with pytest.raises(openai.AuthenticationError) as refused:
        plain(sdk)
    assert refused.value.body["code"] == "key_revoked"
    # Expiry, through the admin API directly.
    status, made, _ = await call(
        "POST", gateway.url + "/admin/keys", _admin(), json={"name": "short", "expires_in": 1}
    )
    assert status == 201, made
    short = client(gateway, made["key"])
    plain(short)
    time.sleep(1.1)
    with pytest.raises(openai.AuthenticationError) as refused:
        plain(short)
    assert refused.value.body["code"] == "key_expired"
    listed = {k["name"]: k for k in keys_cli(gateway, "list")["keys"]}
    assert listed["carol"]["revoked"]
    assert listed["short"]["expired"]
    assert listed["ops"]["source"] == "config"
    # Who did what is on record, by name only.
    status, body, _ = await call("GET", gateway.url + "/admin/events?follow=0", _admin())
    kinds = [(e["kind"], e["data"].get("key_name")) for e in body["events"]]
    assert ("key_created", "carol") in kinds
    assert ("key_revoked", "carol") in kinds
    gateway.stop()
    for path in gateway.state_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data, path
            assert secret[3:20].encode() not in data, path


async def test_hostile_key_requests_are_refused_cleanly(gateway):
    url = gateway.url + "/admin/keys"
    for body in (
        {"name": "../../etc/passwd"},
        {"name": "x" * 65},
        {"name": "open-route"},  # usage without a key is counted under this name
        {"name": "ok", "rpm": -1},
        {"name": "ok", "budget_period": "week"},
        {"name": "ok", "sha256": "00" * 32},  # a digest cannot be chosen by the caller
        {"name": "ok", "models": []},
        {"name": 5},
        ["not", "an", "object"],
    ):
        status, answer, _ = await call("POST", url, _admin(), json=body)
        assert status == 400, (body, answer)
        assert_openai_error(
            answer, "invalid_key_fields" if isinstance(body, dict) else "invalid_json"
        )
    status, answer, _ = await call("POST", url, _admin(), data=b"\xff{not json")
    assert status == 400
    # Only admins manage keys; a name cannot be taken twice; config keys are edited in the file.
    status, answer, _ = await call(
        "POST", url, {"Authorization": f"Bearer {USER_KEY}"}, json={"name": "mine"}
    )
    assert (status, answer["error"]["code"]) == (403, "admin_required")
    for name, code in (("alice", "key_exists"),):
        status, answer, _ = await call("POST", url, _admin(), json={"name": name})
        assert (status, answer["error"]["code"]) == (409, code)
    status, answer, _ = await call("DELETE", url + "/alice", _admin())
    assert (status, answer["error"]["code"]) == (409, "config_key")
    status, answer, _ = await call("PATCH", url + "/nobody", _admin(), json={"rpm": 1})
    assert (status, answer["error"]["code"]) == (404, "key_not_found")
    status, body, _ = await call("GET", url, _admin())
    assert "sha256" not in json.dumps(body)
    assert "digest" not in json.dumps(body)


async def test_runtime_keys_need_an_admin_key_in_the_config(gateway_factory):
    open_gateway = gateway_factory({"chat": fake_model("chat")})
    status, answer, _ = await call("POST", open_gateway.url + "/admin/keys", json={"name": "x"})
    assert (status, answer["error"]["code"]) == (409, "admin_key_required")
    status, _, _ = await call("GET", open_gateway.url + "/v1/models")
    assert status == 200  # still open: no key was made


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_streams_through_upstream_count_too(gateway):
    made = keys_cli(gateway, "create", "dave", "--models", "chat", "--budget", "15")
    headers = {"Authorization": f"Bearer {made['key']}"}
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake_chunks": 5,
    }
    status, text, _ = await call(
        "POST", gateway.url + "/upstream/chat/v1/chat/completions", headers, json=body
    )
    assert status == 200
    assert '"usage"' not in text  # the client did not ask for usage and gets none
    assert text.rstrip().endswith("data: [DONE]")
    entry = await key_entry(gateway, "dave")
    assert entry["usage"]["models"]["chat"]["completion_tokens"] == 5
    assert entry["budget"]["spent"] == STREAM_TOKENS
    status, text, _ = await call(
        "POST", gateway.url + "/upstream/chat/v1/chat/completions", headers, json=body
    )
    assert status == 200  # 10 of 15 spent: it may start
    status, answer, _ = await call(
        "POST", gateway.url + "/upstream/chat/v1/chat/completions", headers, json=body
    )
    assert (status, answer["error"]["code"]) == (429, "budget_exceeded")


async def test_a_reload_may_not_remove_the_last_admin_key_while_runtime_keys_exist(gateway):
    import yaml

    keys_cli(gateway, "create", "erin")
    config = yaml.safe_load(gateway.config_path.read_text())
    config["auth"]["keys"] = [k for k in config["auth"]["keys"] if not k.get("admin")]
    gateway.config_path.write_text(yaml.safe_dump(config))
    status, body, _ = await call("POST", gateway.url + "/admin/reload", _admin())
    assert status == 400
    assert "auth.keys: no admin key left, but runtime keys exist" in body["error"]["message"]
    status, _, _ = await call("GET", gateway.url + "/admin/keys", _admin())
    assert status == 200  # the admin key still works: nothing changed
