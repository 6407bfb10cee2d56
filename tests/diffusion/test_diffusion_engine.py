"""The `diffusion` engine kind: argv, env and config problems (pure; no engine venv needed)."""

from __future__ import annotations

import ast
import subprocess
import sys
from typing import Any

from modelyard.config.schema import GatewayConfig
from modelyard.engines.base import MemoryBudget
from modelyard.engines.diffusion import SERVER_SCRIPT, DiffusionEngine


def gateway(**model: Any) -> GatewayConfig:
    settings = {"engine": "diffusion", "model": "/models/tiny-diffusion", "route": "/vision"}
    return GatewayConfig.model_validate(
        {
            "diffusion": {"executable": ["/venv/bin/python", "-X", "utf8"]},
            "models": {"vision": {**settings, **model}},
        }
    )


def test_argv_runs_the_packaged_server_with_the_gateway_python() -> None:
    config = gateway(args=["--threads", "1"])
    spec = DiffusionEngine().launch_spec("vision", config.models["vision"], config, 8011, None)
    assert spec.argv == [
        "/venv/bin/python",
        "-X",
        "utf8",
        str(SERVER_SCRIPT),
        "--model",
        "/models/tiny-diffusion",
        "--port",
        "8011",
        "--host",
        "127.0.0.1",
        "--served-name",
        "vision",
        "--threads",
        "1",
    ]
    assert SERVER_SCRIPT.is_file()
    assert spec.health_path == "/health"
    assert spec.expect_served_name == "vision"
    assert spec.capabilities.sleep_level == 0
    assert "CUDA_VISIBLE_DEVICES" not in spec.env


def test_model_executable_served_name_and_env_win() -> None:
    config = gateway(executable=["/other/python"], served_name="sd15", env={"HF_HUB_OFFLINE": "1"})
    spec = DiffusionEngine().launch_spec("vision", config.models["vision"], config, 9000, None)
    assert spec.argv[:2] == ["/other/python", str(SERVER_SCRIPT)]
    assert spec.argv[spec.argv.index("--served-name") + 1] == "sd15"
    assert spec.expect_served_name == "sd15"
    assert spec.env["HF_HUB_OFFLINE"] == "1"


def test_a_gpu_budget_pins_the_gpu_and_caps_its_memory() -> None:
    config = gateway()
    budget = MemoryBudget(gpu_indexes=(1,), bytes_per_gpu=6 * 2**30, gpu_total_bytes=24 * 2**30)
    spec = DiffusionEngine().launch_spec("vision", config.models["vision"], config, 8011, budget)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert spec.argv[spec.argv.index("--memory-fraction") + 1] == "0.250"


def test_flags_the_gateway_sets_are_config_problems() -> None:
    config = gateway(args=["--port=1", "--threads", "1", "--served-name", "x"])
    problems = DiffusionEngine().problems("vision", config.models["vision"], config)
    assert problems == [
        "models.vision.args.0: --port is set by the gateway; the gateway picks the port",
        "models.vision.args.3: --served-name is set by the gateway; use 'served_name:' instead",
    ]


def test_the_server_script_imports_nothing_from_modelyard() -> None:
    """It runs in the engine venv, where modelyard is not installed."""
    tree = ast.parse(SERVER_SCRIPT.read_text())
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [name for name in modules if name.startswith("modelyard")]


def test_the_gateway_side_never_imports_torch() -> None:
    code = (
        "import sys, modelyard.engines.diffusion; "
        "sys.exit(bool({'torch', 'diffusers'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
