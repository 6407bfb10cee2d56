"""The demo's real vLLM engines on CPU, started with the argv the gateway would use.

These need the engine venv and the built models: the `demo` fixture makes them on first use
(about 5 minutes once, then well under a second). One engine runs at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.config import GatewayConfig, load_config
from modelyard.demo import DemoSetup, demo_config_path, prepare_demo, write_adapters
from modelyard.engines.base import LaunchSpec
from modelyard.engines.vllm import VllmEngine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

READY_TIMEOUT = 300.0  # about 30-90 s on 2 busy cores


@pytest.fixture(scope="module")
def demo() -> DemoSetup:
    return prepare_demo()


@pytest.fixture(scope="module")
def config(demo: DemoSetup) -> GatewayConfig:
    return load_config(demo_config_path(), {**os.environ, **demo.environ})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def running(spec: LaunchSpec, port: int, log: Path) -> Iterator[str]:
    """Start the engine in its own process group; yield its URL once /health answers 200."""
    env = {**os.environ, **spec.env}
    env.pop("PYTHONPATH", None)
    with log.open("w") as sink:
        process = subprocess.Popen(
            spec.argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert process.poll() is None, f"engine exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-3000:]}"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url + spec.health_path, timeout=2) as response,
            ):
                if response.status == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def chat(url: str, model: str, **extra: Any) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a SQL query that lists all users."}],
        "max_tokens": 16,
        "temperature": 0,
        **extra,
    }
    reply = request(url + "/v1/chat/completions", body)
    return str(reply["choices"][0]["message"]["content"])


def test_chat_serves_smollm2_and_its_two_adapters(config: GatewayConfig, tmp_path: Path):
    port = free_port()
    spec = VllmEngine().launch_spec("chat", config.models["chat"], config, port, None)
    with running(spec, port, tmp_path / "chat.log") as url:
        models = {m["id"]: m for m in request(url + "/v1/models")["data"]}
        assert set(models) == {"chat", "sql-adapter", "email-adapter"}
        assert models["sql-adapter"]["parent"] == "chat"
        assert models["email-adapter"]["parent"] == "chat"
        base, sql = chat(url, "chat"), chat(url, "sql-adapter")
        assert base
        assert sql != base  # the adapter's weights were really applied

        body = {
            "model": "chat",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        }
        post = urllib.request.Request(
            url + "/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(post, timeout=120) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = [line.strip() for line in response if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        assert len(events) > 2


def test_coder_serves_gemma3(config: GatewayConfig, tmp_path: Path):
    port = free_port()
    spec = VllmEngine().launch_spec("coder", config.models["coder"], config, port, None)
    with running(spec, port, tmp_path / "coder.log") as url:
        assert [m["id"] for m in request(url + "/v1/models")["data"]] == ["coder"]
        assert chat(url, "coder")


def test_many_adapters_for_lora_tests(demo: DemoSetup, tmp_path: Path):
    paths = write_adapters(tmp_path, count=20, rank_for={"lora-07": 16}, setup=demo)
    assert [path.name for path in paths][:2] == ["lora-01", "lora-02"]
    assert len(paths) == 20
    ranks = [json.loads((path / "adapter_config.json").read_text())["r"] for path in paths]
    assert ranks.count(16) == 1
    assert ranks.count(8) == 19
    (other,) = write_adapters(tmp_path, ["for-gemma"], base=demo.coder_model, setup=demo)
    config = json.loads((other / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(demo.coder_model)
    (again,) = write_adapters(tmp_path / "again", ["lora-01"], setup=demo)
    weights = "adapter_model.safetensors"
    assert (again / weights).read_bytes() == (paths[0] / weights).read_bytes()  # reproducible
