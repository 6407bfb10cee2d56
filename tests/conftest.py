"""Shared fixtures: run a real `modelyard serve` process with test engines behind it."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
FAKE_ENGINE = str(TESTS / "fake_engine.py")
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fake_engine_command(served_name: str, *extra: str) -> list[str]:
    """argv for `engine: command` that runs the test engine."""
    return [PYTHON, FAKE_ENGINE, "--port", "{port}", "--served-name", served_name, *extra]


def fake_model(served_name: str, *extra: str, **settings: Any) -> dict[str, Any]:
    return {
        "engine": "command",
        "command": fake_engine_command(served_name, *extra),
        "served_name": served_name,
        **settings,
    }


def processes_with(*markers: str) -> list[int]:
    """Live processes whose command line contains any of `markers` (to find leaked engines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(marker in cmdline for marker in markers):
            found.append(int(entry.name))
    return found


@dataclass
class RunningGateway:
    url: str
    process: subprocess.Popen[str]
    config_path: Path
    state_dir: Path
    marker: str
    output: list[str] = field(default_factory=list)
    admin_key: str | None = None  # sent by status() when the gateway has API keys
    tls: bool = False  # serves HTTPS (url keeps http://; tests/security/front_door.py knows)

    def status(self) -> dict[str, Any]:
        import urllib.request

        base = self.url.replace("http://", "https://", 1) if self.tls else self.url
        request = urllib.request.Request(base + "/gateway/status")
        if self.admin_key is not None:
            request.add_header("Authorization", f"Bearer {self.admin_key}")
        context = None
        if self.tls:  # these tests check answers; tests/deploy checks the certificate
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def model_state(self, name: str) -> str:
        for model in self.status()["models"]:
            if model["name"] == name:
                return str(model["state"])
        raise KeyError(name)

    def wait_state(self, name: str, state: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.model_state(name) == state:
                return
            time.sleep(0.05)
        raise AssertionError(f"{name} did not reach {state}; it is {self.model_state(name)}")

    def engine_pids(self) -> list[int]:
        return processes_with(self.marker)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def log_text(self) -> str:
        return (self.state_dir / "gateway.out").read_text(errors="replace")


def start_gateway(
    tmp_path: Path, models: dict[str, Any], marker: str | None = None, **settings: Any
) -> RunningGateway:
    """Write a config and start `modelyard serve` on a free port; wait until it listens."""
    port = free_port()
    state_dir = tmp_path / "state"
    # Every engine argv gets a unique marker so the test can find leaked processes.
    marker = marker or f"mytest-{tmp_path.name}-{port}"
    for model in models.values():
        if model.get("engine") == "command":
            model["command"] = [*model["command"], "--root", marker]
        elif FAKE_ENGINE in model.get("executable", []):
            model["args"] = [*model.get("args", []), "--root", marker]
    config = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(state_dir),
        "models": models,
        **settings,
    }
    config_path = tmp_path / "modelyard.yaml"
    config_path.write_text(yaml.safe_dump(config))
    state_dir.mkdir(parents=True, exist_ok=True)
    out = (state_dir / "gateway.out").open("w")
    process = subprocess.Popen(
        [PYTHON, "-m", "modelyard", "serve", "-c", str(config_path)],
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    gateway = RunningGateway(f"http://127.0.0.1:{port}", process, config_path, state_dir, marker)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited early:\n{gateway.log_text()}")
        if "modelyard listening on http" in gateway.log_text():
            return gateway
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"gateway did not start:\n{gateway.log_text()}")


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    started: list[RunningGateway] = []
    counter = iter(range(1000))

    def factory(models: dict[str, Any], **settings: Any) -> RunningGateway:
        directory = tmp_path / f"gw{next(counter)}"
        directory.mkdir()
        gateway = start_gateway(directory, models, **settings)
        started.append(gateway)
        return gateway

    yield factory
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.stop()
        leaked = gateway.engine_pids()
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        assert not leaked, f"engine processes leaked: {leaked}"
