"""`runtime: ray` in the config; Ray stays out of the gateway unless asked for."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from modelyard.config.schema import GatewayConfig


def test_runtime_ray_with_its_address():
    config = GatewayConfig.model_validate(
        {"runtime": "ray", "ray": {"address": "10.0.0.1:6379"}, "models": {}}
    )
    assert config.runtime == "ray"
    assert config.ray.address == "10.0.0.1:6379"
    assert config.ray.namespace == "modelyard"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"gpus": [{"index": 0, "memory": "24GiB"}]}, "each node's agent reads its GPUs"),
        (
            {"models": {"a": {"engine": "command", "command": ["x", "{port}"], "gpus": [0]}}},
            "placement chooses the node and GPU",
        ),
        ({"ray": {"namespace": "../other"}}, "not a valid namespace"),
        ({"ray": {"namespace": "a" * 65}}, "not a valid namespace"),
        ({"ray": {"adress": "x"}}, "Extra inputs are not permitted"),
    ],
)
def test_bad_ray_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        GatewayConfig.model_validate({"runtime": "ray", "models": {}, **settings})


def test_the_gateway_does_not_import_ray_unless_asked():
    code = (
        "import sys, modelyard.cli, modelyard.gateway, modelyard.server; "
        "print('ray' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_an_unreachable_cluster_is_a_clear_error(tmp_path):
    config = tmp_path / "modelyard.yaml"
    config.write_text(
        "runtime: ray\n"
        "ray: {address: '127.0.0.2:1', node_address: 127.0.0.2}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "models: {}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "cannot connect to the Ray cluster at '127.0.0.2:1'" in result.stderr
    assert "Traceback" not in result.stderr
