"""Keys and secrets against a client who tries (issue 23), on a real `modelyard serve`:

- a remote's URL credential (`http://svc:PASSWORD@host`) is a secret: grepped for in every
  answer, the gateway's log, the engine logs, the events and every state file;
- a key that is not an admin's sees no engine address at all;
- deny by default: an unauthenticated `GET /ui/a/b` lists nothing;
- key names are unique across config and run time: a colliding reload is refused, changing
  nothing;
- a remote is reached on OpenAI's routes and its `upstream_paths:` only;
- a SIGKILLed gateway loses at most the tokens of the last flush window.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from modelyard.state.flushing import FLUSH_INTERVAL_S
from tests.conftest import FAKE_ENGINE, PYTHON, fake_model, free_port
from tests.core.test_remote_engine import SEED_003_NAME, UPSTREAM_KEY, remote
from tests.reliability.running import restart
from tests.security.keys import ADMIN_KEY, USER_KEY, key_config
from tests.security.test_auth_gateway import assert_openai_error, call
from tests.security.test_runtime_keys import keys_cli

__all__ = ["remote"]  # the fixture, used by name

PASSWORD = "Pa55-w0rd-never-shown"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def user() -> dict[str, str]:
    return {"Authorization": f"Bearer {USER_KEY}"}


async def live_events(url: str) -> str:
    """What `GET /admin/events` (SSE: recent events, then live ones) sends in two seconds."""
    received = b""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/admin/events", headers=admin()) as response,
    ):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                async for piece in response.content.iter_any():
                    received += piece
    assert b"gone" in received  # the remote's events are there, masked
    return received.decode()


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


@pytest.fixture
def keyless_remote() -> Iterator[str]:
    """A remote server that asks no key (its URL's credentials are ours to keep secret)."""
    port = free_port()
    process = subprocess.Popen(
        [PYTHON, FAKE_ENGINE, "--port", str(port), "--served-name", SEED_003_NAME],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the remote test server did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


async def test_url_credentials_and_engine_addresses_leak_nowhere(gateway_factory, keyless_remote):
    dead_port = free_port()
    live_url = keyless_remote.replace("http://", f"http://svc:{PASSWORD}@")
    dead_url = f"http://svc:{PASSWORD}@127.0.0.1:{dead_port}/base"
    gateway = gateway_factory(
        {
            "chat": fake_model("chat"),
            "far": {
                "engine": "remote",
                "url": live_url,
                "served_name": SEED_003_NAME,
            },
            "gone": {"engine": "remote", "url": dead_url, "served_name": "gone"},
        },
        auth={
            "keys": [
                key_config("ops", ADMIN_KEY, admin=True),
                key_config("alice", USER_KEY, models=["chat", "far", "gone"]),
            ]
        },
    )
    gateway.admin_key = ADMIN_KEY
    answers: list[str] = []

    async def ask(method: str, path: str, headers: dict[str, str], **kwargs: Any) -> Any:
        status, body, got = await call(method, gateway.url + path, headers, **kwargs)
        answers.append(f"{status} {body} {got}")
        return status, body

    far = {"model": "far", "messages": [{"role": "user", "content": "hi"}]}
    status, _ = await ask("POST", "/v1/chat/completions", user(), json=far)
    assert status == 200
    gone = {"model": "gone", "messages": [{"role": "user", "content": "hi"}]}
    status, body = await ask("POST", "/v1/chat/completions", user(), json=gone)
    assert status == 503, body
    message = body["error"]["message"]
    # A scoped user learns that the remote is down, not where it is.
    for hint in ("127.0.0.1", str(dead_port), "/base", "svc"):
        assert hint not in message, message
    status, body = await ask("POST", "/v1/chat/completions", admin(), json=gone)
    assert status == 503
    assert str(dead_port) in body["error"]["message"]  # an admin does see the address
    for path in ("/gateway/status", "/admin/logs/gone", "/admin/logs/far", "/admin/keys"):
        await ask("GET", path, admin())
    answers.append(await live_events(gateway.url))
    await ask("GET", "/upstream/gone/v1/models", user())
    await asyncio.sleep(FLUSH_INTERVAL_S + 0.5)  # counters and events written to their files
    gateway.stop()
    everything = files_under(gateway.state_dir)
    assert any("events" in name for name in everything)
    assert any(name.endswith(".log") for name in everything)  # the engine logs
    for name, data in everything.items():
        assert PASSWORD.encode() not in data, name
    # The URLs were written (engine logs, events), masked: the check above saw them.
    assert any(b"[redacted]@127.0.0.1" in data for data in everything.values())
    for answer in answers:
        assert PASSWORD not in answer, answer


async def test_an_unauthenticated_request_may_use_nothing_and_learns_nothing(gateway_factory):
    gateway = gateway_factory(
        {"chat": fake_model("chat", route="/coder"), "secret": fake_model("secret")},
        auth={"keys": [key_config("ops", ADMIN_KEY, admin=True)]},
    )
    for path in ("/ui/a/b", "/ui/coder/v1/models", "/ui/../coder/v1/models"):
        status, body, _ = await call("GET", gateway.url + path)
        text = str(body)
        assert "/coder" not in text or status == 400, (path, status, text)
        assert "secret" not in text, (path, text)
    status, body, _ = await call("POST", gateway.url + "/coder/v1/chat/completions", json=CHAT)
    assert status == 401


async def test_a_reload_that_names_a_config_key_like_a_runtime_key_is_refused(gateway_factory):
    gateway = gateway_factory(
        {"chat": fake_model("chat")},
        auth={"keys": [key_config("ops", ADMIN_KEY, admin=True)]},
    )
    made = keys_cli(gateway, "create", "bob", "--models", "chat")
    bob = {"Authorization": f"Bearer {made['key']}"}
    config = yaml.safe_load(gateway.config_path.read_text())
    config["auth"]["keys"].append(key_config("bob", USER_KEY, models=["chat"]))
    gateway.config_path.write_text(yaml.safe_dump(config))
    status, body, _ = await call("POST", gateway.url + "/admin/reload", admin())
    assert status == 400, body
    assert "'bob': a runtime key already has this name" in body["error"]["message"]
    # Nothing changed: the config's new key does not work, the runtime key does, and it can
    # still be changed and revoked.
    status, _, _ = await call("POST", gateway.url + "/v1/chat/completions", user(), json=CHAT)
    assert status == 401
    status, _, _ = await call("POST", gateway.url + "/v1/chat/completions", bob, json=CHAT)
    assert status == 200
    keys_cli(gateway, "revoke", "bob")
    status, _, _ = await call("POST", gateway.url + "/v1/chat/completions", bob, json=CHAT)
    assert status == 401
    # Nor can the collision come in while the gateway is stopped: it does not start.
    gateway.stop()
    started = subprocess.run(
        [PYTHON, "-m", "modelyard", "serve", "-c", str(gateway.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 1
    assert "'bob': a runtime key already has this name" in started.stderr


async def test_a_remote_is_reached_on_openai_routes_and_upstream_paths_only(
    gateway_factory, remote
):
    gateway = gateway_factory(
        {
            "far": {
                "engine": "remote",
                "url": remote.url,
                "api_key": UPSTREAM_KEY,
                "served_name": SEED_003_NAME,
                "route": "/far",
            },
            "open": {
                "engine": "remote",
                "url": remote.url,
                "api_key": UPSTREAM_KEY,
                "served_name": SEED_003_NAME,
                "upstream_paths": ["/fake"],
            },
        },
        auth={"keys": [key_config("ops", ADMIN_KEY, admin=True)]},
    )
    for path in ("/upstream/far/admin/keys", "/far/admin/keys", "/upstream/far/fake/seen"):
        for method in ("GET", "POST"):
            status, body, _ = await call(method, gateway.url + path, admin(), json={})
            assert status == 403, (method, path, body)
            assert_openai_error(body, "path_not_allowed")
    status, body, _ = await call("GET", gateway.url + "/upstream/far/v1/models", admin())
    assert status == 200, body
    status, body, _ = await call("GET", gateway.url + "/upstream/open/fake/seen", admin())
    assert status == 200, body


def budget_spent(gateway: Any, name: str) -> int:
    import json
    import urllib.request

    request = urllib.request.Request(gateway.url + "/admin/keys", headers=admin())
    with urllib.request.urlopen(request, timeout=10) as answer:
        keys = json.loads(answer.read())["keys"]
    entry = next(k for k in keys if k["name"] == name)
    return int(entry["budget"]["spent"])


async def test_a_sigkilled_gateway_loses_at_most_the_last_flush_window(gateway_factory):
    gateway = gateway_factory(
        {"chat": fake_model("chat")},
        auth={
            "keys": [
                key_config("ops", ADMIN_KEY, admin=True),
                key_config("alice", USER_KEY, models=["chat"], token_budget=10**6),
            ]
        },
    )
    gateway.admin_key = ADMIN_KEY
    for _ in range(5):
        status, _, _ = await call("POST", gateway.url + "/v1/chat/completions", user(), json=CHAT)
        assert status == 200
    flushed = budget_spent(gateway, "alice")
    assert flushed == 5 * 8  # 5 prompt tokens, "chat says: hello"
    time.sleep(FLUSH_INTERVAL_S + 1)  # one flush has written them
    for _ in range(3):  # within the next window: may be lost
        await call("POST", gateway.url + "/v1/chat/completions", user(), json=CHAT)
    gateway.stop(signal.SIGKILL)
    again = restart(gateway)
    try:
        after = budget_spent(again, "alice")
        assert flushed <= after <= flushed + 3 * 8
    finally:
        again.stop()
        gateway.process = again.process
