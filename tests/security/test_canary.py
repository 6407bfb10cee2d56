"""The canary test: secrets never leave the gateway.

A canary secret is put where operators put secrets: in a model's `env:` (the engine prints
it, as engines print their settings), in `args` through `${env:...}` (the test engine prints
its unknown flags, as vLLM prints its non-default arguments), and as an API key that clients
present (also in a second credential header). Every route is driven as a user and as an
admin, with a failing start and an engine crash among them. Then every response body, every
file in the state directory (the gateway's log, engine logs, events, usage counters), the
event history, `/gateway/status` and `/metrics` are searched for each canary.
"""

from __future__ import annotations

import asyncio
import json
import secrets

from tests.conftest import FAKE_ENGINE, PYTHON, fake_model
from tests.security.keys import ADMIN_KEY, key_config
from tests.security.raw_http import request

CHAT = [{"role": "user", "content": "hello"}]


async def test_no_canary_leaves_the_gateway(gateway_factory, monkeypatch):
    arg_canary = "canaryARG" + secrets.token_hex(8)
    env_canary = "canaryENV" + secrets.token_hex(8)
    key_canary = "my-canaryKEY" + secrets.token_urlsafe(24)
    monkeypatch.setenv("MODELYARD_TEST_ARG_SECRET", arg_canary)
    chat_command = [
        "sh",
        "-c",
        'echo "engine settings: token=$SECRET_TOKEN"; exec "$@"',
        "sh",
        PYTHON,
        FAKE_ENGINE,
        "--port",
        "{port}",
        "--served-name",
        "chat",
    ]
    models = {
        "chat": {
            "engine": "command",
            "command": chat_command,
            "served_name": "chat",
            "route": "/chat",
            "env": {"SECRET_TOKEN": env_canary},
            "args": ["--hf-token", "${env:MODELYARD_TEST_ARG_SECRET}"],
        },
        "broken": fake_model(
            "broken",
            "--crash-on-start",
            "3",
            env={"SECRET_TOKEN": env_canary},
            args=["--hf-token", "${env:MODELYARD_TEST_ARG_SECRET}"],
        ),
    }
    auth = {
        "keys": [
            key_config("ops", ADMIN_KEY, admin=True),
            key_config("canary-user", key_canary, models=["*"]),
        ]
    }
    gateway = gateway_factory(models, auth=auth)
    gateway.admin_key = ADMIN_KEY
    user = {"Authorization": f"Bearer {key_canary}", "Content-Type": "application/json"}
    admin = {
        "Authorization": f"Bearer {ADMIN_KEY}",
        "api-key": key_canary,  # a second credential header, as Continue sends
        "Content-Type": "application/json",
    }

    def chat(model: str, **extra: object) -> bytes:
        return json.dumps({"model": model, "messages": CHAT, **extra}).encode()

    bodies: list[bytes] = []
    calls = [
        ("GET", "/health", b""),
        ("GET", "/openapi.json", b""),
        ("GET", "/ui/", b""),
        ("GET", "/v1/models", b""),
        ("GET", "/v1/models/chat", b""),
        ("GET", "/v1/models/broken", b""),
        ("POST", "/v1/chat/completions", chat("broken")),  # a failing start
        ("POST", "/v1/chat/completions", chat("chat")),
        ("POST", "/v1/chat/completions", chat("chat", stream=True)),
        ("POST", "/chat/v1/chat/completions", chat("chat")),
        ("GET", "/upstream/chat/v1/models", b""),
        ("GET", "/upstream/chat/health", b""),
        ("POST", "/v1/chat/completions", chat("chat", stream=True, fake_break_after=1)),
        ("POST", "/v1/chat/completions", chat("nosuch")),
        ("POST", "/upstream/chat/sleep", b""),
        ("GET", "/gateway/status", b""),
        ("GET", "/admin/events?follow=0&recent=500", b""),
        ("GET", "/admin/logs/chat?lines=1000", b""),
        ("GET", "/admin/logs/broken?lines=1000", b""),
        ("GET", "/admin/keys", b""),
        ("POST", "/admin/models/broken/load", b""),
        ("POST", "/admin/models/chat/load", b""),
        ("POST", "/admin/models/chat/unload", b""),
        ("GET", "/admin/adapters", b""),
        ("GET", "/metrics", b""),
        ("GET", "/metrics/engines", b""),
    ]
    crash = ("POST", "/v1/chat/completions", chat("chat", fake_crash=9))  # mid-request
    for headers, driven in ((user, [*calls, crash]), (admin, calls)):
        for method, path, body in driven:
            answer = await request(gateway.url, method, path, headers, body)
            assert answer.status != 500, (path, answer)
            bodies.append(answer.body)
    # What the chat engine received (headers included), read last, as admin (after the
    # crash's back-off).
    for _ in range(100):
        answer = await request(gateway.url, "GET", "/upstream/chat/fake/received", admin)
        bodies.append(answer.body)
        if answer.status == 200:
            break
        await asyncio.sleep(0.1)
    assert answer.status == 200
    bodies.append(answer.body)
    # The canaries were really there to be leaked: the engines printed them.
    logs = (await request(gateway.url, "GET", "/admin/logs/chat?lines=1000", admin)).body
    assert b"engine settings: token=[redacted]" in logs
    assert b"--hf-token [redacted]" in logs
    bodies.append(logs)
    gateway.stop()
    files = [path for path in gateway.state_dir.rglob("*") if path.is_file()]
    assert {"gateway.out", "events.sqlite3"} <= {path.name for path in files}
    assert any(path.suffix == ".log" for path in files)
    for canary in (arg_canary, env_canary, key_canary, key_canary[3:20]):
        needle = canary.encode()
        for index, body in enumerate(bodies):
            assert needle not in body, (canary, index, body[:300])
        for path in files:
            assert needle not in path.read_bytes(), (canary, path)
