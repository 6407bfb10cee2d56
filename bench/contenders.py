"""The other proxies the benchmark runs beside modelyard, each in its own venv.

- vllm-router (PyPI `vllm-router`): vLLM's Rust router; one router per upstream, since it
  balances over workers rather than routing by model name.
- LiteLLM's proxy (PyPI `litellm[proxy]`): one process serving every benchmark model.
- the front-door candidates (`--front-doors`, issue 21): bench/front_door_relay.py, the same
  small relay on aiohttp's server alone, on uvicorn (httptools, uvloop) and on granian (RSGI),
  all in one venv (PyPI `granian`, `uvicorn`, `httptools`, `uvloop`, `aiohttp`).

The venvs live under ~/.cache/modelyard-bench and are made on first use (the registry is the
only thing reached over the network); `make test` never installs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

CACHE = Path(os.environ.get("MODELYARD_BENCH_CACHE", Path.home() / ".cache" / "modelyard-bench"))
PACKAGES = {
    "vllm-router": ["vllm-router"],
    "litellm": ["litellm[proxy]"],
    "front-doors": ["granian", "uvicorn", "httptools", "uvloop", "aiohttp"],
}
EXECUTABLES = {"vllm-router": "vllm-router", "litellm": "litellm", "front-doors": "granian"}
RELAY_DIR = Path(__file__).resolve().parent  # bench/, where front_door_relay.py is
# The candidates, each as the command that serves the relay on {port} with one process.
FRONT_DOORS = {
    "aiohttp alone": ["{python}", "front_door_relay.py", "aiohttp", "--port", "{port}"],
    "uvicorn+httptools": [
        "{python}", "-m", "uvicorn", "front_door_relay:asgi", "--app-dir", ".",
        "--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning",
        "--host", "127.0.0.1", "--port", "{port}",
    ],
    "granian rsgi": [
        "{bin}/granian", "--interface", "rsgi", "--working-dir", ".", "--host", "127.0.0.1",
        "--port", "{port}", "--workers", "1", "--loop", "uvloop", "--no-ws",
        "--log-level", "warning", "front_door_relay:rsgi",
    ],
}  # fmt: skip


def venv_bin(name: str) -> Path:
    """The contender's executable, installing it into its own venv on first use."""
    venv = CACHE / name
    executable = venv / "bin" / EXECUTABLES[name]
    if not executable.exists():
        print(f"installing {' '.join(PACKAGES[name])} into {venv} (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", *PACKAGES[name]], check=True
        )
    return executable


@dataclass
class Started:
    process: subprocess.Popen[bytes]
    url: str


def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited at start; see {log}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{url} did not come up in {timeout:.0f}s; see {log}")


def start_vllm_router(upstream: str, port: int, prometheus_port: int, workdir: Path) -> Started:
    log = workdir / f"vllm-router-{port}.log"
    process = subprocess.Popen(
        [
            str(venv_bin("vllm-router")),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            upstream,
            "--policy",
            "round_robin",
            "--log-level",
            "error",
            "--prometheus-port",
            str(prometheus_port),
            "--log-dir",
            str(workdir / f"vllm-router-{port}-logs"),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/health", log, 60)
    return Started(process, url)


def start_litellm(upstreams: dict[str, str], port: int, workdir: Path) -> Started:
    """LiteLLM's proxy with one `openai/<name>` deployment per benchmark model."""
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": url + "/v1",
                    "api_key": "none",
                },
            }
            for name, url in upstreams.items()
        ],
        "litellm_settings": {"telemetry": False, "set_verbose": False},
    }
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / "litellm.log"
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start
        "DISABLE_SCHEMA_UPDATE": "true",
        # No keys, as the other proxies run here (localhost only): LiteLLM refuses otherwise.
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    }
    process = subprocess.Popen(
        [
            str(venv_bin("litellm")),
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=workdir,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/health/liveliness", log, 120)
    return Started(process, url)


def start_front_door(name: str, upstreams: dict[str, str], port: int, workdir: Path) -> Started:
    """One candidate server running bench/front_door_relay.py in front of `upstreams`."""
    bin_dir = venv_bin("front-doors").parent
    command = [
        part.format(python=bin_dir / "python", bin=bin_dir, port=port) for part in FRONT_DOORS[name]
    ]
    log = workdir / f"front-door-{port}.log"
    process = subprocess.Popen(
        command,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=RELAY_DIR,
        env={**os.environ, "RELAY_UPSTREAMS": json.dumps(upstreams)},
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/health", log, 60)
    return Started(process, url)


def describe_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        pip = CACHE / name / "bin" / "pip"
        package = PACKAGES[name][0].split("[")[0]
        try:
            shown = subprocess.run(
                [str(pip), "show", package], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        for line in shown.splitlines():
            if line.startswith("Version:"):
                versions[name] = line.split(":", 1)[1].strip()
    return versions


if __name__ == "__main__":  # install both: python -m bench.contenders
    for contender in PACKAGES:
        venv_bin(contender)
    print(json.dumps(describe_versions()))
