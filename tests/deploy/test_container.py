"""The gateway in a real container, the way compose runs it (`make test-container`).

A private Docker daemon (no trace on the host), a Debian base made by debootstrap (cached), the
repo's Dockerfile built FROM it by `docker compose build`, and compose's `cpu` gateway service
started with tests/deploy/compose.test.yaml on top: host networking, a test config, and the test
engine (tests/fake_engine.py, standing in for vLLM, which is 3.5 GB: `make demo-container`
runs the real one) started by the gateway inside the container. Everything is checked through
the running container and from the host's /proc.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from modelyard.auth.keys import generate_key, key_digest
from tests.conftest import free_port, processes_with
from tests.deploy.compose_files import COMPOSE_FILE, fresh_env_file
from tests.deploy.private_docker import (
    PrivateDocker,
    import_base_image,
    pip_cert,
    start_private_docker,
)
from tests.observability.scrape import scrape
from tests.observability.test_grafana_dashboard import DASHBOARD, MODELYARD_NAME, SUFFIXES, queries

pytestmark = pytest.mark.container

OVERRIDE = Path(__file__).with_name("compose.test.yaml")
FAKE_ENGINE = Path(__file__).resolve().parents[1] / "fake_engine.py"
VLLM_SHAPES = FAKE_ENGINE.with_name("vllm_shapes.py")  # imported by the test engine
SERVICE = "gateway-cpu"
ADMIN_KEY = generate_key()
USER_KEY = generate_key()  # may use `chat` only
CHAT = [{"role": "user", "content": "hello from the host"}]


@dataclass
class Deployment:
    docker: PrivateDocker
    files: list[str]
    url: str
    marker: str
    timings: dict[str, float]

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> Any:
        return self.docker.compose(*self.files, *args, timeout=timeout, check=check)

    def container(self) -> str:
        return str(self.compose("ps", "-a", "-q", SERVICE).stdout.strip())

    def inspect(self, template: str) -> str:
        return str(self.docker.docker("inspect", "-f", template, self.container()).stdout.strip())

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def get(self, path: str, key: str | None = ADMIN_KEY) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path)
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def engine_pids(self) -> list[int]:
        return processes_with(self.marker)

    def logs(self) -> str:
        result = self.compose("logs", "--no-color", SERVICE, check=False)
        return str(result.stdout + result.stderr)


def _write_config(folder: Path, port: int, marker: str) -> Path:
    engine = [
        "/opt/modelyard/bin/python",
        "/opt/modelyard-test/fake_engine.py",
        "--port",
        "{port}",
        "--served-name",
        "chat",
        "--root",
        marker,  # found from the host's /proc
    ]
    config = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": "/var/lib/modelyard/state",  # the compose service's volume
        "limits": {"shutdown_grace": "10s"},
        "defaults": {"stop_grace": "5s", "idle_timeout": "10m"},
        "auth": {
            "keys": [
                {"name": "ops", "sha256": key_digest(ADMIN_KEY), "admin": True},
                {"name": "alice", "sha256": key_digest(USER_KEY), "models": ["chat"]},
            ]
        },
        "models": {
            "chat": {"engine": "command", "command": engine, "route": "/chat"},
            "secret": {"engine": "command", "command": [*engine[:5], "secret", *engine[6:]]},
        },
    }
    path = folder / "modelyard.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)  # read by the container's non-root user
    return path


def _wait_healthy(deployment: Deployment, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if deployment.inspect("{{.State.Health.Status}}") == "healthy":
            return
        assert deployment.inspect("{{.State.Running}}") == "true", deployment.logs()
        time.sleep(0.25)
    raise AssertionError(f"container not healthy in {timeout} s:\n{deployment.logs()}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    timings: dict[str, float] = {}
    started = time.monotonic()
    root = Path(f"/tmp/myd-{uuid.uuid4().hex[:8]}")  # short: the socket path has a length limit
    docker = start_private_docker(root)
    timings["daemon_s"] = time.monotonic() - started
    deployment: Deployment | None = None
    try:
        mark = time.monotonic()
        import_base_image(docker)
        timings["base_image_s"] = time.monotonic() - mark
        folder = tmp_path_factory.mktemp("container")
        port = free_port()
        marker = f"mycontainer-{uuid.uuid4().hex[:12]}"
        env_file = fresh_env_file(folder)
        cert = pip_cert()
        with env_file.open("a") as env:
            env.write(f"BASE_IMAGE=local/python:bookworm\nMODELYARD_TEST_PORT={port}\n")
            env.write(f"MODELYARD_TEST_CONFIG={_write_config(folder, port, marker)}\n")
            env.write(f"MODELYARD_TEST_ENGINE={FAKE_ENGINE}\n")
            env.write(f"MODELYARD_TEST_SHAPES={VLLM_SHAPES}\n")
            if cert is not None:
                env.write(f"PIP_CERT_FILE={cert}\n")
        files = ["-p", f"myt{uuid.uuid4().hex[:6]}", "--env-file", str(env_file)]
        files += ["-f", str(COMPOSE_FILE), "-f", str(OVERRIDE), "--profile", "cpu"]
        deployment = Deployment(docker, files, f"http://127.0.0.1:{port}", marker, timings)
        mark = time.monotonic()
        deployment.compose("build", SERVICE, timeout=900)
        timings["build_s"] = time.monotonic() - mark
        size = docker.docker("image", "inspect", "-f", "{{.Size}}", "modelyard:test").stdout
        timings["image_mb"] = int(size) / 1e6
        mark = time.monotonic()
        deployment.compose("up", "-d", SERVICE, timeout=120)
        _wait_healthy(deployment)
        timings["up_healthy_s"] = time.monotonic() - mark
        yield deployment
    finally:
        if deployment is not None:
            deployment.compose("down", "-v", "--timeout", "30", timeout=120, check=False)
        docker.stop()
        timings["total_s"] = time.monotonic() - started
        print("\ncontainer test timings:", {k: round(v, 1) for k, v in timings.items()})
        assert not processes_with(root.name), "the private daemon left processes behind"


def test_image_runs_as_non_root_with_tini_and_a_healthcheck(deployment: Deployment) -> None:
    assert deployment.inspect("{{.Config.User}}") == "10001:10001"
    assert deployment.inspect("{{.State.Health.Status}}") == "healthy"
    entrypoint = deployment.inspect("{{json .Config.Entrypoint}}")
    assert json.loads(entrypoint)[0] == "/usr/bin/tini"
    mounts = json.loads(deployment.inspect("{{json .Mounts}}"))
    state = next(m for m in mounts if m["Destination"] == "/var/lib/modelyard/state")
    assert state["Type"] == "volume"


def test_models_are_listed_and_keys_are_enforced(deployment: Deployment) -> None:
    status, body = deployment.get("/v1/models", key=None)
    assert status == 401
    assert body["error"]["code"] == "missing_api_key"
    status, body = deployment.get("/v1/models", key="my-not-a-key")
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    status, body = deployment.get("/v1/models", key=USER_KEY)
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["chat"]
    admin = deployment.client(ADMIN_KEY)
    assert sorted(m.id for m in admin.models.list()) == ["chat", "secret"]
    with pytest.raises(openai.NotFoundError):  # a scoped key cannot tell it exists
        deployment.client(USER_KEY).chat.completions.create(model="secret", messages=CHAT)  # type: ignore[arg-type]
    assert deployment.engine_pids() == []  # refused before anything started


def test_chat_is_proxied_to_an_engine_inside_the_container(deployment: Deployment) -> None:
    reply = deployment.client(USER_KEY).chat.completions.create(model="chat", messages=CHAT)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    assert reply.model == "chat"
    # The engine is a child of the gateway in the container, running as the image's user.
    (pid,) = deployment.engine_pids()
    status = Path(f"/proc/{pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert uid == "10001"
    stream = deployment.client(USER_KEY).chat.completions.create(
        model="chat",
        messages=CHAT,  # type: ignore[arg-type]
        stream=True,
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


async def test_every_dashboard_metric_is_exported_by_the_container(
    deployment: Deployment,
) -> None:
    # The Grafana dashboard that compose provisions queries only what this gateway exports.
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    _, families = await scrape(deployment.url + "/metrics", headers=headers)
    exported = {f.name + s for f in families for s in SUFFIXES.get(f.type, ("",))}
    engine_samples, _ = await scrape(deployment.url + "/metrics/engines", headers=headers)
    exported |= {name for name, _ in engine_samples}
    queried = {
        m for q in queries(json.loads(DASHBOARD.read_text())) for m in MODELYARD_NAME.findall(q)
    }
    assert sorted(queried - exported) == []


def test_docker_stop_stops_engines_cleanly_and_state_survives_a_restart(
    deployment: Deployment,
) -> None:
    status, before = deployment.get("/admin/keys")
    assert status == 200
    alice = next(k for k in before["keys"] if k["name"] == "alice")["usage"]["requests"]
    assert alice >= 3
    assert len(deployment.engine_pids()) == 1
    grace = 75  # the compose service's stop_grace_period
    started = time.monotonic()
    deployment.compose("stop", SERVICE, timeout=grace + 30)
    took = time.monotonic() - started
    deployment.timings["docker_stop_s"] = took
    # Exit 0 means the gateway itself exited after stopping its engine: a SIGKILL at the end
    # of the grace would be 137.
    assert deployment.inspect("{{.State.ExitCode}}") == "0", deployment.logs()
    assert took < grace
    assert deployment.engine_pids() == []
    logs = deployment.logs()
    assert "modelyard stopped" in logs
    # Started again: the same volume, so the usage counters kept in state_dir's SQLite remain.
    deployment.compose("start", SERVICE, timeout=60)
    _wait_healthy(deployment)
    status, after = deployment.get("/admin/keys")
    assert status == 200
    kept = next(k for k in after["keys"] if k["name"] == "alice")["usage"]["requests"]
    assert kept >= alice
    assert deployment.engine_pids() == []  # nothing starts until asked
    reply = deployment.client(USER_KEY).chat.completions.create(model="chat", messages=CHAT)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    assert os.path.exists(f"/proc/{deployment.engine_pids()[0]}")
