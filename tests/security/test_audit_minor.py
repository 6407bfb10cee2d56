"""The audit's minor findings (issue 12), each reproduced.

The gateway's answers run in-process (tests/harness.py serves the app as `modelyard serve`
does: aiohttp's server with OpenAI-shaped protocol errors, a real loopback port). What
the gateway writes to its log and the CLI's refusal stay on a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import fake_model, free_port
from tests.harness import Harness, engine_model, in_process_gateway
from tests.security.keys import ADMIN_KEY, USER_KEY, auth_settings, bearer
from tests.security.raw_http import is_openai_error, request, send_raw

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
JSON = {"Content-Type": "application/json"}


def keyed_models():
    return {
        "chat": engine_model(served_name="chat", route="/chat"),
        "secret": engine_model(served_name="secret", route="/secret"),
    }


async def test_protocol_level_errors_have_openai_shape(tmp_path):
    async with in_process_gateway(tmp_path, {}) as gateway:
        await _protocol_errors(gateway)


async def _protocol_errors(gateway: Harness) -> None:
    for data in [
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
        b"G\x01T /health HTTP/1.1\r\n\r\n",
        b"GET /health HTTP/9.9\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ]:
        answer = await send_raw(gateway.url, data)
        assert answer.status == 400, (data[:40], answer)
        assert answer.headers["content-type"].startswith("application/json")
        assert is_openai_error(answer), answer.body
        assert b"aaaa" not in answer.body  # the offending bytes are not echoed


CONTROL_TARGETS = ["/v1/chat%01/completions", "/chat/x%1b[31mred", "/chat/%0a%0dforged"]


async def send_control_characters(url: str) -> None:
    for target in CONTROL_TARGETS:
        answer = await request(url, "POST", target, JSON, json.dumps(CHAT).encode())
        assert answer.status == 400, answer
    answer = await request(
        url, "POST", "/chat/v1/chat/completions", JSON, json.dumps(CHAT).encode()
    )
    assert answer.status == 200


async def test_control_characters_never_reach_labels_or_log_lines(tmp_path):
    models = {"chat": engine_model(served_name="chat", route="/chat")}
    async with in_process_gateway(tmp_path, models) as gateway:
        await send_control_characters(gateway.url)
        metrics = await request(gateway.url, "GET", "/metrics")
    text = metrics.body.decode()
    assert not [c for c in text if ord(c) < 0x20 and c != "\n"]
    assert "forged" not in text


async def test_control_characters_never_reach_the_log_on_disk(gateway_factory):
    # Process-level: what `modelyard serve` writes to its log.
    gateway = gateway_factory({"chat": fake_model("chat", route="/chat")})
    await send_control_characters(gateway.url)
    assert "\x1b" not in gateway.log_text()


async def break_a_stream(url: str) -> None:
    body = json.dumps({**CHAT, "stream": True, "fake_chunks": 5, "fake_break_after": 2})
    answer = await request(url, "POST", "/v1/chat/completions", JSON, body.encode())
    assert answer.status == 200  # the header was sent before the engine broke off
    assert b"upstream_stream_broken" in answer.body


async def test_a_stream_broken_by_its_engine_is_counted_as_an_error(tmp_path):
    async with in_process_gateway(tmp_path, {"chat": engine_model(served_name="chat")}) as h:
        await break_a_stream(h.url)
        metrics = (await request(h.url, "GET", "/metrics")).body.decode()
    counted = [
        line for line in metrics.splitlines() if line.startswith("modelyard_requests_total{")
    ]
    assert any('status="502"' in line for line in counted), counted
    assert not any('status="200"' in line for line in counted), counted


async def test_a_stream_broken_by_its_engine_is_logged_as_502(gateway_factory):
    # Process-level: the request line in the log `modelyard serve` writes.
    gateway = gateway_factory({"chat": fake_model("chat")})
    await break_a_stream(gateway.url)
    assert "status=502" in gateway.log_text()


def test_unwritable_state_dir_is_a_clear_error_in_check_and_serve(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = tmp_path / "modelyard.yaml"
    config.write_text(
        yaml.safe_dump({"listen": f"127.0.0.1:{free_port()}", "state_dir": str(blocker / "state")})
    )
    for verb in ("check", "serve"):
        result = subprocess.run(
            [sys.executable, "-m", "modelyard", verb, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, (verb, result.stdout, result.stderr)
        assert "state_dir" in result.stderr
        assert "not a writable directory" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert len(result.stderr.splitlines()) <= 3


async def test_route_404_names_only_routes_the_key_may_use(tmp_path):
    async with in_process_gateway(tmp_path, keyed_models(), **auth_settings()) as gateway:
        await _route_404(gateway)


async def _route_404(gateway: Harness) -> None:
    for target in ("/nosuch/v1/chat/completions", "/secret/v1/chat/completions"):
        answer = await request(
            gateway.url, "POST", target, {**JSON, **bearer(USER_KEY)}, json.dumps(CHAT).encode()
        )
        assert answer.status == 404
        message = answer.json()["error"]["message"]
        assert message.split("routes:")[1].strip() == "/chat", message
    # A path that matches no route at all lists nothing.
    answer = await request(gateway.url, "GET", "/nosuch", bearer(ADMIN_KEY))
    assert answer.status == 404
    assert "/chat" not in answer.body.decode()


async def test_duplicate_model_keys_are_refused(tmp_path):
    async with in_process_gateway(tmp_path, keyed_models(), **auth_settings()) as gateway:
        await _duplicate_model_keys(gateway)


async def _duplicate_model_keys(gateway: Harness) -> None:
    headers = {**JSON, **bearer(USER_KEY)}
    messages = '"messages": [{"role": "user", "content": "hi"}]'
    for body in [
        '{"model": "chat", "model": "secret", ' + messages + "}",
        '{"model": "secret", ' + messages + ', "model": "chat"}',
        '{"model": "chat", "mod\\u0065l": "secret", ' + messages + "}",
    ]:
        for target in ("/v1/chat/completions", "/chat/v1/chat/completions"):
            answer = await request(gateway.url, "POST", target, headers, body.encode())
            assert answer.status == 400, (body, target, answer)
            assert answer.json()["error"]["code"] == "duplicate_model"
    assert gateway.model_state("secret") == "stopped"
    # A nested "model" (inside a tool's schema, say) is not a duplicate.
    nested = {**CHAT, "tools": [{"model": "x"}], "metadata": {"model": "y"}}
    answer = await request(
        gateway.url, "POST", "/v1/chat/completions", headers, json.dumps(nested).encode()
    )
    assert answer.status == 200


DEEP_LIST = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"model": ' * 50_000 + b"1" + b"}" * 50_000


async def test_deeply_nested_bodies_are_a_400_on_every_json_route(tmp_path):
    """Python's json recurses per level: `[[[[...` 100,000 deep raises RecursionError, which
    is not a ValueError. CI's fuzzer found POST /admin/keys answering 500 for it."""
    settings = auth_settings()
    settings["limits"] = {"max_body_bytes": 1024 * 1024}
    async with in_process_gateway(tmp_path, keyed_models(), **settings) as gateway:
        targets = [
            ("POST", "/admin/keys", ADMIN_KEY),
            ("PATCH", "/admin/keys/someone", ADMIN_KEY),
            ("POST", "/v1/chat/completions", USER_KEY),
            ("POST", "/chat/v1/chat/completions", USER_KEY),
            # A key limited to some models: the gateway reads the body to check its model.
            # (An admin's body goes to the engine unread; the engine answers for it.)
            ("POST", "/upstream/chat/v1/chat/completions", USER_KEY),
        ]
        for method, target, key in targets:
            for body in (DEEP_LIST, DEEP_OBJECT):
                answer = await request(gateway.url, method, target, {**JSON, **bearer(key)}, body)
                assert is_openai_error(answer), answer.body[:200]
                code = answer.json()["error"]["code"]
                if target.startswith("/upstream") and body is DEEP_LIST:
                    # Not a JSON object, so its model cannot be checked: refused before parsing.
                    assert (answer.status, code) == (415, "unsupported_media_type"), answer
                else:
                    assert (answer.status, code) == (400, "invalid_json"), (target, answer)
        # Nothing was started for them, and the gateway still answers.
        assert gateway.model_state("chat") == "stopped"
        answer = await request(gateway.url, "GET", "/health", {})
        assert answer.status == 200
