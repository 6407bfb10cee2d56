"""GPU inventories: NVML against a fake `pynvml` module, the declared one, and the /proc walk
against real child processes.

No GPU exists on the machines that run these tests. The fake module below has the shape of
nvidia-ml-py's `pynvml` (the same function names, `NVMLError`, memory info objects with
total/used/free, process objects with `pid` and `usedGpuMemory`, which nvidia-ml-py sets to
None when the driver cannot say, as under Windows WDDM). Each test says which real behaviour
it stands for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from modelyard.config.schema import GpuConfig
from modelyard.placement.inventory import (
    DeclaredGpu,
    DeclaredInventory,
    GpuInventory,
    GpuInventoryError,
    NvmlInventory,
    ProcessMemoryUnavailable,
    process_trees,
)

GIB = 1024**3


# ----- real processes -----


@dataclass
class Tree:
    root: int
    child: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


@pytest.fixture
def tree() -> Iterator[Tree]:
    """A real process with a real child, like vLLM's API server and its engine core."""
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    root = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert root.stdout is not None
    child = int(root.stdout.readline())
    yield Tree(root.pid, child, [root])
    for pid in (child, root.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    root.wait()


def test_process_trees_collects_children_from_proc(tree: Tree) -> None:
    found = process_trees([tree.root])
    assert {tree.root, tree.child} <= found
    assert os.getpid() not in found  # the parent is not part of the engine


def test_process_trees_of_a_gone_process_is_empty() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert process_trees([process.pid]) == set()


# ----- a pynvml-shaped fake -----


class FakeNvmlError(Exception):
    """Stands for pynvml.NVMLError (its str() is NVML's message, e.g. 'Driver Not Loaded')."""


@dataclass
class FakeDevice:
    name: str | bytes
    total: int
    used: int
    compute: list[tuple[int, int | None]] = field(default_factory=list)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)


def fake_pynvml(devices: list[FakeDevice], fail_init: str | None = None) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    calls: dict[str, int] = {"init": 0, "shutdown": 0}

    def init() -> None:
        calls["init"] += 1
        if fail_init:
            raise FakeNvmlError(fail_init)

    def handle(index: int) -> FakeDevice:
        if index >= len(devices):
            raise FakeNvmlError("Invalid Argument")
        return devices[index]

    def processes(entries: list[tuple[int, int | None]]) -> list[Any]:
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in entries]

    module.NVMLError = FakeNvmlError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda d: d.name  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda d: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=d.total, used=d.used, free=d.total - d.used
    )
    module.nvmlDeviceGetComputeRunningProcesses = lambda d: processes(d.compute)  # type: ignore[attr-defined]
    module.nvmlDeviceGetGraphicsRunningProcesses = lambda d: processes(d.graphics)  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


def test_nvml_lists_gpus_with_memory() -> None:
    # Stands for two GPUs; older nvidia-ml-py returned names as bytes, newer as str.
    nvml = fake_pynvml(
        [FakeDevice(b"NVIDIA GeForce RTX 4080", 16 * GIB, 2 * GIB), FakeDevice("H100", 80 * GIB, 0)]
    )
    gpus = NvmlInventory(nvml).gpus()
    assert [(g.index, g.name, g.total_bytes, g.used_bytes, g.free_bytes) for g in gpus] == [
        (0, "NVIDIA GeForce RTX 4080", 16 * GIB, 2 * GIB, 14 * GIB),
        (1, "H100", 80 * GIB, 0, 80 * GIB),
    ]
    assert nvml.calls["init"] == 1  # type: ignore[attr-defined]


def test_nvml_attributes_memory_to_the_whole_process_tree(tree: Tree) -> None:
    # Stands for vLLM with tensor parallelism: the API server holds a little (its CUDA
    # context), its worker child holds the weights on another GPU; an unrelated process
    # (another user's job) holds memory too and must not be counted.
    stranger = os.getpid()
    nvml = fake_pynvml(
        [
            FakeDevice("gpu0", 24 * GIB, 20 * GIB, compute=[(tree.root, GIB), (stranger, 5 * GIB)]),
            FakeDevice("gpu1", 24 * GIB, 12 * GIB, compute=[(tree.child, 12 * GIB)]),
        ]
    )
    inventory: GpuInventory = NvmlInventory(nvml)
    assert inventory.process_memory([tree.root]) == {0: GIB, 1: 12 * GIB}
    assert inventory.process_memory([tree.child]) == {1: 12 * GIB}


def test_nvml_counts_a_process_listed_as_compute_and_graphics_once(tree: Tree) -> None:
    # Stands for a GPU with a display attached, where NVML may list a process in both lists.
    nvml = fake_pynvml(
        [FakeDevice("gpu0", 24 * GIB, 8 * GIB, [(tree.root, 8 * GIB)], [(tree.root, 8 * GIB)])]
    )
    assert NvmlInventory(nvml).process_memory([tree.root]) == {0: 8 * GIB}


def test_nvml_without_per_process_memory_says_so(tree: Tree) -> None:
    # Stands for Windows WDDM (WSL2, the seed 000's machine): processes listed, memory None.
    nvml = fake_pynvml([FakeDevice("gpu0", 16 * GIB, 9 * GIB, compute=[(tree.root, None)])])
    with pytest.raises(ProcessMemoryUnavailable, match="WDDM"):
        NvmlInventory(nvml).process_memory([tree.root])


def test_nvml_process_of_another_tree_with_unknown_memory_is_ignored(tree: Tree) -> None:
    nvml = fake_pynvml([FakeDevice("gpu0", 16 * GIB, 9 * GIB, compute=[(os.getpid(), None)])])
    assert NvmlInventory(nvml).process_memory([tree.root]) == {}


def test_nvml_module_missing_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands for a machine without nvidia-ml-py installed.
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(GpuInventoryError, match=r"nvidia-ml-py.*declare the GPUs"):
        NvmlInventory().gpus()


def test_nvml_init_failure_is_a_clear_error() -> None:
    # Stands for nvmlInit raising NVMLError_DriverNotLoaded (no driver, or a container
    # started without the NVIDIA runtime).
    nvml = fake_pynvml([], fail_init="Driver Not Loaded")
    with pytest.raises(GpuInventoryError, match=r"Driver Not Loaded.*nvidia-smi"):
        NvmlInventory(nvml).gpus()


def test_nvml_failure_mid_query_is_a_clear_error() -> None:
    # Stands for NVMLError_GpuIsLost (a GPU fell off the bus) on a per-device call.
    nvml = fake_pynvml([FakeDevice("gpu0", GIB, 0)])

    def lost(_: object) -> None:
        raise FakeNvmlError("GPU is lost")

    nvml.nvmlDeviceGetMemoryInfo = lost  # type: ignore[attr-defined]
    with pytest.raises(GpuInventoryError, match="nvmlDeviceGetMemoryInfo failed: GPU is lost"):
        NvmlInventory(nvml).gpus()


def test_nvml_close_shuts_down_once() -> None:
    nvml = fake_pynvml([FakeDevice("gpu0", GIB, 0)])
    inventory = NvmlInventory(nvml)
    inventory.gpus()
    inventory.close()
    inventory.close()
    assert nvml.calls["shutdown"] == 1  # type: ignore[attr-defined]


# ----- declared -----


def test_declared_from_config() -> None:
    inventory = DeclaredInventory.from_config(
        [GpuConfig(index=0, memory=24 * GIB), GpuConfig(index=1, memory=16 * GIB, name="4080")]
    )
    gpus = inventory.gpus()
    assert [(g.index, g.name, g.total_bytes, g.used_bytes) for g in gpus] == [
        (0, "declared", 24 * GIB, 0),
        (1, "4080", 16 * GIB, 0),
    ]


def test_declared_used_is_what_live_processes_reported(tree: Tree) -> None:
    inventory: GpuInventory
    declared = DeclaredInventory([DeclaredGpu(0, 24 * GIB), DeclaredGpu(1, 24 * GIB)])
    inventory = declared
    declared.set_process_memory(tree.child, {0: 10 * GIB, 1: 2 * GIB})
    declared.set_foreign_bytes(0, GIB)
    assert [(g.used_bytes, g.free_bytes) for g in inventory.gpus()] == [
        (11 * GIB, 13 * GIB),
        (2 * GIB, 22 * GIB),
    ]
    # The engine is known by its root pid; its child reported the memory.
    assert inventory.process_memory([tree.root]) == {0: 10 * GIB, 1: 2 * GIB}


def test_declared_memory_comes_back_when_the_process_is_gone(tree: Tree) -> None:
    declared = DeclaredInventory([DeclaredGpu(0, 24 * GIB)])
    declared.set_process_memory(tree.child, {0: 10 * GIB})
    os.kill(tree.child, signal.SIGKILL)  # its parent does not reap it: a zombie, then gone
    deadline = time.monotonic() + 5
    while declared.gpus()[0].used_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert declared.gpus()[0].used_bytes == 0
    assert declared.process_memory([tree.root]) == {}


def test_declared_forget_and_unknown_gpu(tree: Tree) -> None:
    declared = DeclaredInventory([DeclaredGpu(0, 24 * GIB)])
    declared.set_process_memory(tree.root, {0: GIB})
    declared.forget_process(tree.root)
    assert declared.gpus()[0].used_bytes == 0
    with pytest.raises(GpuInventoryError, match="GPU 3 is not declared"):
        declared.set_process_memory(tree.root, {3: GIB})
    with pytest.raises(GpuInventoryError, match="GPU 2 is not declared"):
        declared.set_foreign_bytes(2, GIB)
