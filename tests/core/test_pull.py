"""`modelyard pull` against a local server that speaks the hub's download API: the files land
in HF_HOME's cache where vLLM looks, HF_TOKEN is sent, HF_ENDPOINT is used, progress bars show,
and refusals say what to do."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from modelyard.placement.estimate import weights_bytes
from tests.fake_hub import COMMIT, FakeHub, FakeRepo

WEIGHTS = {
    "config.json": b'{"architectures": ["Qwen2ForCausalLM"]}',
    "model-00001-of-00002.safetensors": b"\x01" * 300_000,
    "model-00002-of-00002.safetensors": b"\x02" * 200_000,
}


@pytest.fixture
async def hub() -> AsyncIterator[tuple[FakeHub, str]]:
    fake = FakeHub(
        {
            "org/tiny": FakeRepo(dict(WEIGHTS)),
            "org/gated": FakeRepo({"config.json": b"{}"}, token="hf_secret_token"),
        }
    )
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def modelyard_pull(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelyard", "pull", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def hub_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **extra,
    }


async def test_pull_downloads_into_hf_home_where_vllm_looks(
    hub: tuple[FakeHub, str], tmp_path: Path
) -> None:
    fake, endpoint = hub
    fake.chunk_delay_s = 0.01
    env = hub_env(tmp_path, endpoint)
    status, output = await modelyard_pull("org/tiny", env=env)
    assert status == 0, output
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    for name, data in WEIGHTS.items():
        assert (snapshot / name).read_bytes() == data
    assert f"org/tiny: 488.3 KiB in {snapshot}" in output
    assert "100%" in output  # huggingface_hub's progress bar
    # the gateway's own estimate finds them where the engine would
    assert weights_bytes("org/tiny", {"HF_HOME": str(tmp_path / "hf")}) == 500_000
    # a second pull downloads nothing again
    before = len([path for path in fake.paths if "/resolve/" in path])
    status, output = await modelyard_pull("org/tiny", env=env)
    assert status == 0, output
    assert len([path for path in fake.paths if "/resolve/" in path]) == before


async def test_pull_sends_hf_token_for_a_gated_repo(
    hub: tuple[FakeHub, str], tmp_path: Path
) -> None:
    fake, endpoint = hub
    status, output = await modelyard_pull("org/gated", env=hub_env(tmp_path, endpoint))
    assert status == 1
    assert "access is restricted; set HF_TOKEN" in output or "set HF_TOKEN" in output, output
    assert "Traceback" not in output
    env = hub_env(tmp_path, endpoint, HF_TOKEN="hf_secret_token")
    status, output = await modelyard_pull("org/gated", env=env)
    assert status == 0, output
    assert "Bearer hf_secret_token" in fake.authorizations
    assert "hf_secret_token" not in output


async def test_pull_a_config_model_uses_its_weights_and_engine_env(
    hub: tuple[FakeHub, str], tmp_path: Path
) -> None:
    _, endpoint = hub
    config = tmp_path / "modelyard.yaml"
    own_home = tmp_path / "engine-hf"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "state"),
                "vllm": {"executable": ["/bin/true", "serve"]},
                "models": {"chat": {"model": "org/tiny", "env": {"HF_HOME": str(own_home)}}},
            }
        )
    )
    status, output = await modelyard_pull(
        "chat", "-c", str(config), env=hub_env(tmp_path, endpoint)
    )
    assert status == 0, output
    assert (own_home / "hub" / "models--org--tiny" / "snapshots" / COMMIT / "config.json").is_file()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("org/missing", "org/missing: no such repository (or it is private: set HF_TOKEN)"),
        ("/no/such/folder", "is a local path that does not exist"),
        ("just-a-name", "neither a model of the config nor a hub name"),
    ],
)
async def test_pull_refusals_are_one_clear_line(
    hub: tuple[FakeHub, str], tmp_path: Path, name: str, message: str
) -> None:
    _, endpoint = hub
    status, output = await modelyard_pull(name, env=hub_env(tmp_path, endpoint))
    assert status == 1
    assert message in output, output
    assert "Traceback" not in output


async def test_pull_says_when_the_hub_cannot_be_reached(tmp_path: Path) -> None:
    env = hub_env(tmp_path, "http://127.0.0.1:9")  # nothing listens there
    status, output = await modelyard_pull("org/tiny", env=env)
    assert status == 1
    assert "org/tiny: the hub could not be reached" in output, output
    assert "Traceback" not in output
