"""deploy/systemd/modelyard.service: valid for systemd, and its stop and restart settings fit
the gateway's own shutdown. (This machine's PID 1 is not systemd, so the unit is verified with
`systemd-analyze verify`, not started.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from modelyard.config.schema import DefaultsConfig, LimitsConfig
from tests.deploy.private_docker import REPO

UNIT = REPO / "deploy" / "systemd" / "modelyard.service"


def settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found[key].append(value)
    return found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's modelyard.
    modelyard = Path(sys.executable).with_name("modelyard")
    unit = tmp_path / "modelyard.service"
    unit.write_text(UNIT.read_text().replace("/opt/modelyard/bin/modelyard", str(modelyard)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "modelyard.service" not in result.stderr, result.stderr  # no ignored keys


def test_stop_gives_the_gateway_time_to_drain_and_stop_its_engines() -> None:
    unit = settings()
    assert unit["KillMode"] == ["mixed"]  # SIGTERM to the gateway alone; it stops the engines
    assert unit["KillSignal"] == ["SIGTERM"]
    drain = LimitsConfig().shutdown_grace + DefaultsConfig().stop_grace
    assert float(unit["TimeoutStopSec"][0]) > drain
    assert unit["Restart"] == ["on-failure"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["ExecStart"][0].endswith("modelyard serve -c /etc/modelyard/modelyard.yaml")


def test_unit_is_hardened_but_leaves_gpus_visible() -> None:
    unit = settings()
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectKernelModules": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit[key] == [value], key
    assert unit["User"] == ["modelyard"]
    assert "PrivateDevices" not in unit  # would hide /dev/nvidia*
    assert "MemoryDenyWriteExecute" not in unit  # PyTorch and Triton JIT need it off
