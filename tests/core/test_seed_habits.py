"""The seeds' habits: engine keys, preload, `modelyard logs`, shared defaults, served names,
path-like model names, and routes left open without a key.

What the engine process received (its argv, its environment, its log on disk), the CLI and
the start message stay on a real `modelyard serve`; the open route's HTTP decisions run
in-process (tests/harness.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from modelyard.config import ConfigError
from modelyard.config.loader import parse_config
from modelyard.engines import engine_kind
from tests.conftest import FAKE_ENGINE, PYTHON, fake_model
from tests.harness import Harness, engine_model, in_process_gateway
from tests.security.keys import ADMIN_KEY, key_config
from tests.security.test_auth_gateway import assert_openai_error, call

ENGINE_KEY = "vllm-secret-0123456789"


def vllm_model(**settings: object) -> dict[str, object]:
    """`engine: vllm` run by the test engine, which parses vLLM's command line."""
    return {"engine": "vllm", "executable": [PYTHON, FAKE_ENGINE], **settings}


async def test_engine_api_key_lets_an_engine_with_api_key_become_ready(
    gateway_factory, monkeypatch
):
    # Seed 000 starts vLLM with --api-key $VLLM_API_KEY: its /v1 routes answer 401 without it.
    monkeypatch.setenv("SEED_VLLM_API_KEY", ENGINE_KEY)
    gateway = gateway_factory(
        {
            "coder": vllm_model(
                model="/srv/llm/coder",
                served_name="qwen-coder",
                engine_api_key="${env:SEED_VLLM_API_KEY}",
                start_timeout=20,
            )
        }
    )
    status, body, _ = await call(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={"model": "coder", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 200, body
    # The served name is accepted as a model name too (seeds 002 and 004).
    status, body, _ = await call(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={"model": "qwen-coder", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert (status, body["model"]) == (200, "qwen-coder")
    status, body, _ = await call("GET", gateway.url + "/v1/models/qwen-coder")
    assert (status, body["id"], body["alias_of"]) == (200, "qwen-coder", "coder")
    _, seen, _ = await call("GET", gateway.url + "/upstream/coder/fake/seen")
    assert ENGINE_KEY not in " ".join(seen["argv"])  # given as VLLM_API_KEY, not in the argv
    log_text = "\n".join(path.read_text() for path in (gateway.state_dir / "logs").glob("*.log"))
    assert ENGINE_KEY not in log_text


def test_check_warns_about_api_key_in_args_without_engine_api_key(tmp_path: Path):
    config = tmp_path / "seed000.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "vllm": {"executable": ["/bin/true", "serve"]},  # `check` wants it there
                "models": {
                    "coder": {
                        "model": "/srv/llm/coder",
                        "args": ["--api-key", "${env:VLLM_API_KEY:-x}"],
                    }
                },
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "models.coder.args: --api-key is set but engine_api_key is not" in result.stderr
    # The engine log shows the argv with the key hidden.
    from modelyard.runtime.process import redacted

    assert redacted(["vllm", "--api-key", "s3cret", "--api-key=s3cret"]) == [
        "vllm",
        "--api-key",
        "[redacted]",
        "--api-key=[redacted]",
    ]


def test_defaults_are_shared_by_every_model_and_a_model_wins():
    config = parse_config(
        {
            "defaults": {
                "env": {"HF_HOME": "/cache", "SHARED": "default"},
                "args": ["--swap-space", "16"],
                "max_model_len": 4096,
            },
            "models": {
                "a": {"model": "/m/a"},
                "b": {"model": "/m/b", "max_model_len": 1024, "env": {"SHARED": "mine"}},
                "c": {"engine": "command", "command": ["server", "{port}"]},
            },
        }
    )
    specs = {
        name: engine_kind(model.engine).launch_spec(name, model, config, 9, None)
        for name, model in config.models.items()
    }
    argv_a = specs["a"].argv
    assert argv_a[argv_a.index("--max-model-len") + 1] == "4096"
    assert argv_a[-2:] == ["--swap-space", "16"]
    argv_b = specs["b"].argv
    assert argv_b[argv_b.index("--max-model-len") + 1] == "1024"
    assert specs["a"].env["SHARED"] == "default"
    assert specs["b"].env["SHARED"] == "mine"
    assert specs["c"].env["HF_HOME"] == "/cache"  # env reaches every started engine
    assert "--swap-space" not in specs["c"].argv  # args are vLLM's
    # A gateway-owned flag in the shared args is refused like in a model's.
    bad = parse_config({"defaults": {"args": ["--port", "1"]}, "models": {"a": {"model": "x"}}})
    problems = engine_kind("vllm").problems("a", bad.models["a"], bad)
    assert any(problem.startswith("defaults.args.0: --port") for problem in problems)


async def test_preload_and_logs(gateway_factory):
    gateway = gateway_factory(
        {"warm": fake_model("warm", preload=True), "cold": fake_model("cold")}
    )
    gateway.wait_state("warm", "ready", timeout=20)
    assert gateway.model_state("cold") == "stopped"
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", "logs", "warm", "--url", gateway.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Application startup complete." in result.stdout
    # -f follows: a line written after the command started arrives too.
    follower = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "logs", "warm", "-f", "-n", "0", "--url", gateway.url],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        await call("POST", gateway.url + "/admin/models/warm/unload")
        await call("POST", gateway.url + "/admin/models/warm/load")
        assert follower.stdout is not None
        deadline = time.monotonic() + 20
        seen = ""
        while "starting" not in seen and time.monotonic() < deadline:
            seen += follower.stdout.readline()
        assert "fake engine warm starting" in seen or "[modelyard] starting" in seen
    finally:
        follower.kill()
        follower.wait()
    bad = subprocess.run(
        [sys.executable, "-m", "modelyard", "logs", "../../etc/passwd", "--url", gateway.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "400: invalid request path" in bad.stderr  # refused before any model lookup


def test_path_like_names_are_accepted_and_traversal_is_not():
    name = "/models/medium/coding/qwen2.5-coder-7b-gptq"
    config = parse_config({"models": {"coder": {"model": name, "aliases": [name, "/c"]}}})
    assert config.models["coder"].aliases == [name, "/c"]
    for bad in ("/models/../etc", "//models", "/", "/models/", "../x"):
        with pytest.raises(ConfigError, match="is not a valid model name"):
            parse_config({"models": {"coder": {"model": "m", "aliases": [bad]}}})


def test_an_open_route_is_stated_loudly_at_start(gateway_factory):
    # Process-level: the start message of `modelyard serve`.
    gateway = gateway_factory(
        {
            "vision": fake_model("vision", route="/vision", open_route=True),
            "chat": fake_model("chat", route="/chat"),
        },
        auth={"keys": [key_config("ops", ADMIN_KEY, admin=True)]},
    )
    assert "route /vision is OPEN (open_route: true)" in gateway.log_text()


async def test_open_route_serves_its_model_without_a_key_and_nothing_else(tmp_path):
    models = {
        "vision": engine_model(served_name="vision", route="/vision", open_route=True),
        "chat": engine_model(served_name="chat", route="/chat"),
    }
    auth = {"keys": [key_config("ops", ADMIN_KEY, admin=True)]}
    async with in_process_gateway(tmp_path, models, auth=auth) as gateway:
        await _open_route(gateway)


async def _open_route(gateway: Harness) -> None:
    status, body, _ = await call(
        "POST", gateway.url + "/vision/generate", json={"prompt": "sunset", "seed": 1337}
    )
    assert status == 200, body
    assert body["path"] == "/generate"
    for method, path, payload in (
        ("POST", "/chat/v1/chat/completions", {"messages": []}),
        ("POST", "/v1/chat/completions", {"model": "vision", "messages": []}),
        ("GET", "/v1/models", None),
        ("GET", "/admin/keys", None),
        ("POST", "/vision/../chat/v1/chat/completions", {"messages": []}),
    ):
        status, body, _ = await call(method, gateway.url + path, json=payload)
        assert status == 401, (path, body)
    # The open route still keeps the engine's control endpoints for admins.
    for path in ("/vision/sleep?level=1", "/vision/v1/load_lora_adapter", "/vision/%2e%2e/sleep"):
        status, body, _ = await call("POST", gateway.url + path, json={})
        assert status in (401, 403, 404), (path, body)  # '..' leaves the open route: 401
        if status == 403:
            assert_openai_error(body, "admin_required")
    _, metrics, _ = await call(
        "GET", gateway.url + "/metrics", {"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert 'key="open-route"' in metrics
    # Off by default, and only with a route.
    assert parse_config({"models": {"m": {"model": "x"}}}).models["m"].open_route is False
    with pytest.raises(ConfigError, match="'open_route' needs a 'route:'"):
        parse_config({"models": {"m": {"model": "x", "open_route": True}}})
    status, seen, _ = await call(
        "GET", gateway.url + "/upstream/vision/fake/seen", {"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert seen["sleeping"] == 0  # no control request reached the engine
    assert json.dumps(body)
