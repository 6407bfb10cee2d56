"""One real Ray cluster for the module: a head without GPUs, two workers with one each."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="needs the ray extra: pip install 'modelyard[ray]'")

from tests.conftest import RunningGateway
from tests.ray.cluster import GIB, LocalCluster, free_base_port


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    base = free_base_port()
    # Not under pytest's temporary folder: a pytest run elsewhere on the machine may prune
    # that, and Ray's sockets and session live here while the cluster runs.
    root = Path(tempfile.mkdtemp(prefix="modelyard-ray-"))
    local = LocalCluster(base, root)
    try:
        # The head runs the gateway; the GPUs are on the workers. One node at a time: on a
        # loaded 2-core machine, nodes that register together can time out.
        local.wait_started(local.start_node(0, {}))
        local.start_worker(1, {0: 24 * GIB})
        local.start_worker(2, {0: 24 * GIB})
        local.wait_nodes(3)
        yield local
    finally:
        local.stop()
        left = [pid for node in [*local.nodes, *local.failed] for pid in node.alive_pids()]
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"ray processes left running: {left}"


@pytest.fixture
def gateways() -> Iterator[list[RunningGateway]]:
    """The gateways a test starts: stopped after it, and none may leave an engine behind."""
    started: list[RunningGateway] = []
    yield started
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.stop(timeout=60)
    time.sleep(0.5)
    leaked = [pid for gateway in started for pid in gateway.engine_pids()]
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"engine processes leaked: {leaked}"
