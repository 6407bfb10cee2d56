"""Restarting a test gateway on the same config and state directory."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.conftest import RunningGateway


def restart(gateway: RunningGateway) -> RunningGateway:
    """Start `modelyard serve` again for a stopped gateway; the caller stops it."""
    assert gateway.process.poll() is not None, "stop the gateway first"
    out = (gateway.state_dir / "gateway.out").open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "serve", "-c", str(gateway.config_path)],
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    again = RunningGateway(
        gateway.url, process, gateway.config_path, gateway.state_dir, gateway.marker
    )
    again.admin_key = gateway.admin_key
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited:\n{again.log_text()}")
        try:
            again.status()
            return again
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("the gateway did not come back")
