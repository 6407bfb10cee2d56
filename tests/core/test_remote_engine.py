"""`engine: remote`: an OpenAI-compatible server that something else runs (seeds 001 and 003).

The test engine plays the server another host or a container runs, started by the test (never
by the gateway), with vLLM's `--api-key` so the gateway must send the configured key. The
gateway runs in-process (tests/harness.py serves the app as `modelyard serve` does): what is
tested is how it connects to, checks and forwards to a server it does not run.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest

from modelyard.config import ConfigError
from modelyard.config.loader import parse_config
from tests.conftest import FAKE_ENGINE, PYTHON, free_port
from tests.harness import Harness, in_process_gateway
from tests.security.keys import ADMIN_KEY, USER_KEY, key_config
from tests.security.test_auth_gateway import assert_openai_error, call

UPSTREAM_KEY = "remote-secret-123"
SEED_003_NAME = "/models/medium/coding/qwen2.5-coder-7b-gptq"


class RemoteServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                PYTHON,
                FAKE_ENGINE,
                "--port",
                str(self.port),
                "--served-name",
                SEED_003_NAME,
                "--api-key",
                UPSTREAM_KEY,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                import urllib.request

                urllib.request.urlopen(self.url + "/health", timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the remote test server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def remote() -> Iterator[RemoteServer]:
    server = RemoteServer(free_port())
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def gateway(
    tmp_path: Path, remote: RemoteServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    monkeypatch.setenv("REMOTE_KEY", UPSTREAM_KEY)  # the gateway reads it through ${env:}
    async with in_process_gateway(
        tmp_path,
        {
            "far": {
                "engine": "remote",
                "url": remote.url,
                "api_key": "${env:REMOTE_KEY}",
                "served_name": SEED_003_NAME,
                "aliases": ["far-alias"],
                "route": "/far",
                # The test server's own endpoints (a remote is reached on OpenAI's routes
                # and the paths opened here only).
                "upstream_paths": ["/fake"],
            }
        },
        auth={
            "keys": [
                key_config("ops", ADMIN_KEY, admin=True),
                key_config("alice", USER_KEY, models=["chat"]),
            ]
        },
        limits={"health_check_interval": 0.5},
    ) as running:
        yield running
    for client in CLIENTS:  # before the test's event loop ends
        await client.close()
    CLIENTS.clear()


CLIENTS: list[openai.AsyncOpenAI] = []


def sdk(gateway: Harness, key: str = ADMIN_KEY) -> openai.AsyncOpenAI:
    # The async client: the gateway runs in the test's own event loop.
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    CLIENTS.append(client)
    return client


async def ask(client: openai.AsyncOpenAI, model: str) -> str:
    answer = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],  # type: ignore[list-item]
    )
    return answer.choices[0].message.content or ""


async def test_remote_engine_serves_by_name_alias_served_name_and_route(gateway, remote):
    await gateway.wait_state("far", "ready")  # connected at start: no request needed
    client = sdk(gateway)
    assert await ask(client, "far") == f"{SEED_003_NAME} says: hi"
    assert await ask(client, "far-alias") == f"{SEED_003_NAME} says: hi"
    assert await ask(client, SEED_003_NAME) == f"{SEED_003_NAME} says: hi"  # seed 003's clients
    status, body, _ = await call(
        "POST",
        gateway.url + "/far/v1/chat/completions",
        {"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"messages": [{"role": "user", "content": "x"}]},
    )
    assert status == 200, body
    # The engine got the configured key, never the client's.
    status, seen, _ = await call(
        "GET", gateway.url + "/upstream/far/fake/seen", {"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    headers = {k.lower(): v for k, v in seen["last"]["headers"].items()}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert ADMIN_KEY not in str(seen)
    # Shown in status and metrics like any model, with no process of ours.
    far = gateway.status()["models"][0]
    assert (far["engine"], far["url"], far["state"], far["pid"]) == (
        "remote",
        remote.url,
        "ready",
        None,
    )
    _, metrics, _ = await call(
        "GET", gateway.url + "/metrics", {"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert 'modelyard_engine_state{model="far",state="ready"} 1.0' in metrics
    assert 'modelyard_requests_total{key="ops",model="far"' in metrics
    # A key scoped to other models may not use it, and nothing is contacted for it.
    with pytest.raises(openai.NotFoundError):  # as if it did not exist
        await ask(sdk(gateway, USER_KEY), "far")


async def test_a_remote_that_is_down_gets_503_with_retry_after_and_is_never_started(
    gateway, remote
):
    client = sdk(gateway)
    await ask(client, "far")
    remote.kill()
    for _ in range(2):  # in use when it went down, then at connect
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as refused:
            await ask(client, "far")
        assert refused.value.status_code == 503
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        assert refused.value.body["code"] == "remote_unavailable"
        assert time.monotonic() - started < 5  # not held for the whole start timeout
    assert "not answering" in refused.value.body["message"]
    assert gateway.engine_pids() == []
    _, body, _ = await call(
        "GET", gateway.url + "/admin/events?follow=0", {"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    kinds = [event["kind"] for event in body["events"] if event["model"] == "far"]
    assert "remote_down" in kinds
    assert "hung" not in kinds  # not a crash of ours: no back-off, no crash count
    # Back up: found by the gateway's checks (no request needed), then served again.
    assert gateway.model_state("far") == "failed"
    remote.start()
    await gateway.wait_state("far", "ready", timeout=10)
    assert (await ask(client, "far")).endswith("says: hi")
    # The gateway's shutdown (as `modelyard serve` ends) leaves the remote server running:
    # it is not ours.
    await gateway.close()
    assert remote.process is not None
    assert remote.process.poll() is None
    os.kill(remote.process.pid, 0)


async def test_remote_settings_are_checked(tmp_path):
    for model, message in (
        ({"engine": "remote"}, "needs 'url:'"),
        ({"engine": "remote", "url": "file:///etc/passwd"}, "is not an http(s) URL"),
        ({"engine": "remote", "url": "http://h:1 x"}, "is not an http(s) URL"),
        ({"engine": "remote", "url": "http://h:1", "args": ["--x"]}, "args cannot be set"),
        ({"engine": "remote", "url": "http://h:1", "sleep": 1}, "sleep cannot be set"),
        ({"engine": "vllm", "model": "m", "api_key": "k"}, "only for engine 'remote'"),
    ):
        with pytest.raises(ConfigError) as error:
            parse_config({"models": {"m": model}}, "f.yaml")
        assert message in str(error.value), (model, str(error.value))
    ok = parse_config({"models": {"m": {"engine": "remote", "url": "https://gpu-host:8001/"}}})
    assert ok.models["m"].url == "https://gpu-host:8001"


async def test_clients_cannot_point_the_gateway_at_another_server(gateway):
    # A client cannot point the gateway elsewhere: the URL is the config's alone.
    status, body, _ = await call(
        "POST",
        gateway.url + "/v1/chat/completions",
        {"Authorization": f"Bearer {ADMIN_KEY}", "Host": "evil.example"},
        json={"model": "far", "url": "http://127.0.0.1:1", "messages": []},
    )
    assert status == 200, body
    status, body, _ = await call(
        "POST",
        gateway.url + "/v1/chat/completions",
        {"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"model": "http://127.0.0.1:1/v1", "messages": []},
    )
    assert status == 404
    assert_openai_error(body, "model_not_found")
