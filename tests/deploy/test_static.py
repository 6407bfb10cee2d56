"""Static checks of what ships in deploy/ and the Dockerfile, with the real tools: hadolint,
Compose v2's own `config`, and the gateway's own config loader. GPU containers cannot run on
this machine (no /dev/nvidia*, no nvidia-container-toolkit): the `gpu` profile is validated
here, statically, and never started."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelyard.config import parse_config
from tests.deploy.compose_files import (
    COMPOSE_FILE,
    DEPLOY,
    GATEWAY_SERVICES,
    PROFILES,
    compose,
    fresh_env_file,
    read_env_file,
    resolved,
)
from tests.deploy.private_docker import REPO, compose_binary

OPENAPI = REPO / "src" / "modelyard" / "api" / "openapi.yaml"


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_env_file(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def model(env_file: Path) -> dict[str, Any]:
    return resolved(env_file, *PROFILES)


def services(model: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = model["services"]
    return result


def mounted(service: dict[str, Any], target: str) -> Path:
    for volume in service.get("volumes", []):
        if volume["target"] == target:
            assert volume["type"] == "bind", volume
            return Path(volume["source"])
    raise AssertionError(f"nothing mounted at {target}")


def gateway_config(model: dict[str, Any], name: str, env_file: Path) -> Any:
    """A gateway service's mounted config, loaded by modelyard with the service's environment."""
    service = services(model)[name]
    path = mounted(service, "/etc/modelyard/modelyard.yaml")
    environ = {
        **service["environment"],
        "MODELYARD_HOME": "/opt/modelyard-demo",
        "MODELYARD_VLLM": "/opt/modelyard-demo/engine-venv/bin/modelyard-vllm",
        "MODELYARD_ENGINE_PYTHON": "/opt/modelyard-demo/engine-venv/bin/python",
    }
    return parse_config(yaml.safe_load(path.read_text()), str(path), environ)


def dockerfiles() -> list[Path]:
    found = [
        path
        for path in REPO.rglob("*Dockerfile*")
        if path.is_file() and not {".venv", ".git", "test-artifacts"} & set(path.parts)
    ]
    return sorted(found)


# --- the real linters -------------------------------------------------------------------


def test_hadolint_accepts_every_dockerfile() -> None:
    files = dockerfiles()
    assert REPO / "Dockerfile" in files
    hadolint = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "hadolint"
    binary = str(hadolint) if hadolint.exists() else "hadolint"
    for dockerfile in files:
        result = subprocess.run(
            [binary, "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, f"{dockerfile}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("profile", [*PROFILES, "all"])
def test_compose_accepts_every_profile(env_file: Path, profile: str) -> None:
    chosen = PROFILES if profile == "all" else (profile,)
    flags = [part for name in chosen for part in ("--profile", name)]
    result = compose(*flags, "config", "-q", env_file=env_file)
    assert result.returncode == 0, result.stderr
    listed = compose(*flags, "config", "--services", env_file=env_file)
    assert listed.stdout.split(), f"profile {profile} starts no service"


def test_compose_refuses_to_run_without_the_secrets() -> None:
    # No .env: the user is told how to make one, instead of a gateway with empty key digests.
    # Compose names the first missing variable it meets, in no fixed order: every required
    # variable's message must say it, so each run is tried a few times.
    for _ in range(5):
        result = compose("--profile", "gpu", "config", "-q", env_file=None)
        assert result.returncode != 0
        assert "new-env.sh" in result.stderr, result.stderr


def test_every_required_variable_says_how_to_make_the_env_file() -> None:
    text = COMPOSE_FILE.read_text()
    required = re.findall(r"\$\{(\w+):\?([^}]*)\}", text)
    assert required
    for name, message in required:
        assert "new-env.sh" in message, name


# --- what the compose file promises ------------------------------------------------------


def test_gpu_gateway_reserves_nvidia_gpus_and_shares_host_ipc(model: dict[str, Any]) -> None:
    gateway = services(model)["gateway"]
    devices = gateway["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gateway["ipc"] == "host" or "shm_size" in gateway
    assert gateway["build"]["target"] == "gpu"
    assert "/var/run/docker.sock" not in json.dumps(model), "no Docker socket anywhere"
    assert "/models" in {v["target"] for v in gateway["volumes"]}


def test_both_gateways_keep_state_caches_and_config_in_volumes(
    model: dict[str, Any], env_file: Path
) -> None:
    for name in GATEWAY_SERVICES:
        service = services(model)[name]
        targets = {v["target"]: v for v in service["volumes"]}
        config = gateway_config(model, name, env_file)
        assert targets[config.state_dir]["type"] == "volume", f"{name}: state_dir"
        assert targets["/cache"]["type"] == "volume", f"{name}: HF and vLLM caches"
        assert targets["/etc/modelyard/modelyard.yaml"]["read_only"] is True
        assert "modelyard" in service["networks"]["default"]["aliases"]
        # docker stop waits longer than the gateway's drain plus an engine's stop.
        grace = _go_duration(service["stop_grace_period"])
        needed = config.limits.shutdown_grace + max(
            [config.defaults.stop_grace]
            + [m.stop_grace for m in config.models.values() if m.stop_grace is not None]
        )
        assert grace > needed, f"{name}: stop_grace_period {grace} s <= {needed} s"
        assert {"MODELYARD_ADMIN_KEY_SHA256", "PROMETHEUS_METRICS_KEY_SHA256"} <= set(
            service["environment"]
        )


def test_gateway_configs_load_with_the_keys_the_env_file_holds(
    model: dict[str, Any], env_file: Path
) -> None:
    env = read_env_file(env_file)
    for name in GATEWAY_SERVICES:
        config = gateway_config(model, name, env_file)
        digests = {key.name: key.sha256 for key in config.auth.keys}
        assert digests["admin"] == _sha256(env["MODELYARD_ADMIN_KEY"])
        assert digests["open-webui"] == _sha256(env["OPENWEBUI_API_KEY"])
        assert digests["prometheus"] == _sha256(env["PROMETHEUS_METRICS_KEY"])
        prometheus = next(k for k in config.auth.keys if k.name == "prometheus")
        assert prometheus.metrics is True
        assert prometheus.models == []  # read-only: no model, no admin route
        assert config.port == 8000
        assert config.host == "0.0.0.0"


def test_open_webui_talks_to_modelyard_with_its_own_key(
    model: dict[str, Any], env_file: Path
) -> None:
    webui = services(model)["open-webui"]["environment"]
    config = gateway_config(model, "gateway", env_file)
    assert webui["OPENAI_API_BASE_URL"] == f"http://modelyard:{config.port}/v1"
    env = read_env_file(env_file)
    assert webui["OPENAI_API_KEY"] == env["OPENWEBUI_API_KEY"]
    webui_key = next(k for k in config.auth.keys if k.name == "open-webui")
    assert webui_key.admin is False
    assert webui_key.models == ["*"]


def test_prometheus_scrapes_the_gateways_metrics_routes_with_the_metrics_key(
    model: dict[str, Any], env_file: Path
) -> None:
    service = services(model)["prometheus"]
    scrape = yaml.safe_load(mounted(service, "/etc/prometheus/prometheus.yml").read_text())
    config = gateway_config(model, "gateway", env_file)
    routes = set(yaml.safe_load(OPENAPI.read_text())["paths"])
    secret = next(s for s in service["secrets"] if s["source"] == "metrics_key")
    assert model["secrets"]["metrics_key"]["environment"] == "PROMETHEUS_METRICS_KEY"
    paths = set()
    for job in scrape["scrape_configs"]:
        assert job["metrics_path"] in routes, job
        paths.add(job["metrics_path"])
        targets = [t for group in job["static_configs"] for t in group["targets"]]
        assert targets == [f"modelyard:{config.port}"]
        assert job["authorization"]["credentials_file"] == f"/run/secrets/{secret['target']}"
    assert paths == {"/metrics", "/metrics/engines"}


def test_grafana_provisions_the_datasource_and_the_modelyard_dashboard(
    model: dict[str, Any],
) -> None:
    grafana = services(model)["grafana"]
    provisioning = mounted(grafana, "/etc/grafana/provisioning")
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ][0]
    prometheus_port = services(model)["prometheus"]["ports"][0]["target"]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True
    provider = yaml.safe_load((provisioning / "dashboards" / "modelyard.yaml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    dashboard = mounted(grafana, f"{folder}/modelyard.json")
    assert dashboard == DEPLOY / "grafana" / "modelyard.json"
    assert json.loads(dashboard.read_text())["uid"] == "modelyard"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == (
        f"{folder}/modelyard.json"
    )


def test_tailscale_serves_modelyard_over_https(model: dict[str, Any], env_file: Path) -> None:
    sidecar = services(model)["tailscale"]
    serve = json.loads(mounted(sidecar, "/config/serve.json").read_text())
    config = gateway_config(model, "gateway", env_file)
    assert sidecar["environment"]["TS_SERVE_CONFIG"] == "/config/serve.json"
    assert serve["TCP"]["443"]["HTTPS"] is True
    (site,) = serve["Web"].values()
    assert site["Handlers"]["/"]["Proxy"] == f"http://modelyard:{config.port}"
    assert serve["AllowFunnel"] == {"${TS_CERT_DOMAIN}:443": False}  # tailnet only
    assert "/dev/net/tun" in {d["source"] for d in sidecar["devices"]}
    assert sidecar["environment"]["TS_STATE_DIR"] in {v["target"] for v in sidecar["volumes"]}


def test_every_mounted_file_exists(model: dict[str, Any], env_file: Path) -> None:
    # A missing source would be created as an empty folder by Docker and fail obscurely.
    user_paths = {read_env_file(env_file)["MODELS_DIR"]}  # the user's weights, from .env
    checked = 0
    for name, service in services(model).items():
        for volume in service.get("volumes", []):
            if volume["type"] != "bind":
                continue
            source = Path(volume["source"])
            if str(source) in user_paths:
                continue
            assert source.is_relative_to(REPO), f"{name}: {source} is outside the repository"
            assert source.exists(), f"{name}: {source} does not exist"
            checked += 1
    for name, secret in model["secrets"].items():
        if "file" in secret:
            assert Path(secret["file"]).is_file(), f"secret {name}: {secret['file']}"
            checked += 1
    assert checked == 7  # 2 gateway configs, Prometheus, Grafana x2, Tailscale, pip_cert


def test_env_file_is_never_committed_and_the_example_names_every_variable() -> None:
    for path in ("deploy/.env", ".env"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False)
        assert ignored.returncode == 0, f"{path} is not ignored by git"
    example = set(read_env_file(DEPLOY / ".env.example"))
    used = _variables_in(COMPOSE_FILE.read_text())
    optional = {
        name for name in used if f"${{{name}:-" in COMPOSE_FILE.read_text() or name.endswith("_TAG")
    }
    assert sorted(used - optional - example) == []


def _variables_in(text: str) -> set[str]:
    import re

    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text)) | {
        name for name in re.findall(r"environment: ([A-Z_][A-Z0-9_]*)", text)
    }


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _go_duration(text: str) -> float:
    """Compose prints durations the Go way: 1m15s, 90s, 1h2m3.5s."""
    import re

    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(float(number) * units[unit] for number, unit in parts)


def test_pip_certificate_secret_is_optional_in_every_build_step() -> None:
    # Users without a TLS-intercepting proxy pass no secret: the mount is then absent, and
    # each step must build exactly as it would without the option.
    checked = 0
    for dockerfile in dockerfiles():
        steps = dockerfile.read_text().replace("\\\n", " ").splitlines()
        for step in steps:
            if "id=pip_cert" not in step or not step.startswith("RUN "):
                continue
            checked += 1
            assert "required=true" not in step, step
            assert "if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=" in step, step
            assert "PIP_CERT=/run/secrets/pip_cert" not in step.split("then", 1)[0], step
    assert checked == 3  # build, cpu-engine, gpu


@pytest.mark.parametrize("config", ["modelyard.gpu.yaml", "modelyard.cpu.yaml"])
def test_modelyard_check_accepts_the_container_configs(env_file: Path, config: str) -> None:
    # What the container's gateway will be given: the .env's digests and the image's paths
    # (which exist in the image, not here: this machine's programs and folders are not checked).
    import os
    import sys

    environ = {
        **os.environ,
        **read_env_file(env_file),
        "MODELYARD_HOME": "/opt/modelyard-demo",
        "MODELYARD_VLLM": "/opt/modelyard-demo/engine-venv/bin/modelyard-vllm",
        "MODELYARD_ENGINE_PYTHON": "/opt/modelyard-demo/engine-venv/bin/python",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelyard",
            "check",
            "--skip-machine-checks",
            "-c",
            str(DEPLOY / config),
        ],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config OK" in result.stdout
    assert "3 API key(s), 1 admin" in result.stdout


# --- the documented steps, as written ------------------------------------------------------


def documented_compose_commands() -> list[str]:
    from tests.docs.blocks import SHELL, blocks

    return [
        command
        for block in blocks(SHELL)
        if block.page == "docs/deployment.md"
        for command in block.commands
        if command.startswith(("cd deploy", "./new-env.sh", "docker compose"))
    ]


def test_the_documented_compose_steps_resolve_with_the_env_file_as_written(tmp_path: Path) -> None:
    # A reader's checkout: `cd deploy`, `./new-env.sh > .env` (compose reads .env from the
    # project folder by itself, nothing added), then each `docker compose` line with only the
    # profiles it names. `up` and `build` need a Docker daemon (and GPUs for `gpu`), so each is
    # resolved with `config -q`, which reads and interpolates exactly what they would.
    checkout = tmp_path / "modelyard"
    shutil.copytree(DEPLOY, checkout / "deploy", ignore=shutil.ignore_patterns(".env", "*.whl"))
    shutil.copy2(REPO / "Dockerfile", checkout / "Dockerfile")
    commands = documented_compose_commands()
    assert [command.split("#")[0].strip() for command in commands[:2]] == [
        "cd deploy",
        "./new-env.sh > .env",
    ]
    cwd = checkout
    profiles_seen = set()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    for command in commands:
        if command.startswith("cd "):
            cwd = cwd / command.split()[1]
            continue
        if command.startswith("./new-env.sh"):
            subprocess.run(["sh", "-c", command], cwd=cwd, env=env, check=True)
            continue
        words = shlex.split(command, comments=True)
        flags = [word for pair in pairwise(words) if pair[0] == "--profile" for word in pair]
        assert flags, command
        profiles_seen.update(flags[1::2])
        result = subprocess.run(
            [str(compose_binary()), *flags, "config", "-q"],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{command}:\n{result.stderr}"
    assert set(PROFILES) <= profiles_seen
