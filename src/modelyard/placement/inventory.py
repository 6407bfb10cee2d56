"""What the GPUs hold: NVML on real GPUs, or a declared inventory (config `gpus:`) elsewhere.

Both answer the same two questions: the GPUs with their total and used memory, and how much
of it an engine's process tree holds. Attribution is per process (NVML lists each process's
memory), so an engine is measured while others run; the seed 004 had to stop every other
model for an isolated "discovery run" to learn one footprint.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from modelyard.proctree import is_zombie, process_tree


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    # On a Ray cluster: the node this GPU is in (`index` is then a cluster-wide key for the
    # pair node and GPU, see runtime/ray/cluster.py); None on one machine.
    node: str | None = None
    local_index: int | None = None


class GpuInventoryError(Exception):
    """The GPUs cannot be read (NVML missing or failing); the message says what to do."""


class ProcessMemoryUnavailable(GpuInventoryError):
    """NVML lists the process but not its memory (Windows WDDM, so WSL2 as in the seed 000).

    Callers fall back to the device's used memory before and after the start.
    """


class GpuInventory(Protocol):
    def gpus(self) -> list[GpuInfo]:
        """Every GPU, with memory as it is now."""

    def process_memory(self, pids: Iterable[int]) -> dict[int, int]:
        """Bytes held on each GPU (by index) by these processes and all their descendants."""


def process_trees(
    roots: Iterable[int], tree: Callable[[int], list[int]] = process_tree
) -> set[int]:
    """The live pids of every root's process tree (vLLM's engine core and TP workers are
    children of the API server, and they hold the GPU memory, not the server)."""
    pids: set[int] = set()
    for root in roots:
        pids.update(tree(root))
    return pids


class NvmlInventory:
    """GPUs through NVML (`nvidia-ml-py`, imported when first needed).

    NVML numbers GPUs in PCI bus order. CUDA's default order is "fastest first", so engines
    must run with CUDA_DEVICE_ORDER=PCI_BUS_ID for an index to mean the same GPU to both.
    NVML reports host pids: inside a container without the host's pid namespace no engine
    process matches and attribution comes back empty.
    """

    def __init__(
        self,
        nvml: ModuleType | None = None,
        tree: Callable[[int], list[int]] = process_tree,
    ) -> None:
        self._nvml = nvml
        self._tree = tree
        self._ready = False
        self._lock = threading.Lock()

    def gpus(self) -> list[GpuInfo]:
        nvml = self._lib()
        found = []
        for index in range(self._call(nvml, "nvmlDeviceGetCount")):
            handle = self._call(nvml, "nvmlDeviceGetHandleByIndex", index)
            memory = self._call(nvml, "nvmlDeviceGetMemoryInfo", handle)
            name = self._call(nvml, "nvmlDeviceGetName", handle)
            if isinstance(name, bytes):  # nvidia-ml-py before 11.515 returned bytes
                name = name.decode(errors="replace")
            found.append(
                GpuInfo(
                    index=index,
                    name=str(name),
                    total_bytes=int(memory.total),
                    used_bytes=int(memory.used),
                    free_bytes=int(memory.free),
                )
            )
        return found

    def process_memory(self, pids: Iterable[int]) -> dict[int, int]:
        nvml = self._lib()
        tree = process_trees(pids, self._tree)
        held: dict[int, int] = {}
        for index in range(self._call(nvml, "nvmlDeviceGetCount")):
            handle = self._call(nvml, "nvmlDeviceGetHandleByIndex", index)
            # vLLM shows as a compute process; a process can also appear in the graphics
            # list (e.g. with a display attached). Count each pid once per GPU.
            listed: dict[int, Any] = {}
            for query in (
                "nvmlDeviceGetComputeRunningProcesses",
                "nvmlDeviceGetGraphicsRunningProcesses",
            ):
                if not hasattr(nvml, query):
                    continue
                for process in self._call(nvml, query, handle):
                    listed.setdefault(int(process.pid), process)
            for pid, process in listed.items():
                if pid not in tree:
                    continue
                if process.usedGpuMemory is None:
                    raise ProcessMemoryUnavailable(
                        f"NVML lists pid {pid} on GPU {index} without its memory (Windows "
                        "WDDM driver model, as under WSL2); per-process attribution is not "
                        "possible on this machine"
                    )
                held[index] = held.get(index, 0) + int(process.usedGpuMemory)
        return held

    def close(self) -> None:
        with self._lock:
            if self._ready and self._nvml is not None:
                self._ready = False
                try:
                    self._nvml.nvmlShutdown()
                except Exception as error:  # shutting down: report, do not mask the exit
                    raise GpuInventoryError(f"NVML shutdown failed: {error}") from error

    def _lib(self) -> ModuleType:
        with self._lock:
            if self._nvml is None:
                try:
                    self._nvml = importlib.import_module("pynvml")
                except ImportError as error:
                    raise GpuInventoryError(
                        "NVML is not available: install nvidia-ml-py (pip install "
                        "'modelyard[nvml]'), or declare the GPUs in the config "
                        "(gpus: [{index: 0, memory: 24GiB}])"
                    ) from error
            if not self._ready:
                try:
                    self._nvml.nvmlInit()
                except Exception as error:  # pynvml.NVMLError and ctypes' OSError alike
                    raise GpuInventoryError(
                        f"NVML failed to start ({error}): is the NVIDIA driver loaded "
                        "(nvidia-smi)? Otherwise declare the GPUs in the config"
                    ) from error
                self._ready = True
            return self._nvml

    @staticmethod
    def _call(nvml: ModuleType, function: str, *args: Any) -> Any:
        try:
            return getattr(nvml, function)(*args)
        except Exception as error:  # pynvml.NVMLError: GPU lost, driver reset, ...
            raise GpuInventoryError(f"NVML {function} failed: {error}") from error


@dataclass(frozen=True)
class DeclaredGpu:
    index: int
    total_bytes: int
    name: str = "declared"


class DeclaredInventory:
    """GPUs as the config declares them; memory in use is what the gateway was told.

    Nothing measures these GPUs, so "used" is the sum of what callers report per process
    (an engine's measured or claimed footprint) plus memory set aside for other programs.
    Only processes still alive count: a stopped engine's memory comes back when its process
    tree is gone, which is also how the gateway knows it may start the next one.
    """

    def __init__(
        self,
        gpus: Iterable[DeclaredGpu],
        tree: Callable[[int], list[int]] = process_tree,
        alive: Callable[[int], bool] | None = None,
    ) -> None:
        self._gpus = {gpu.index: gpu for gpu in gpus}
        self._tree = tree
        self._alive = alive or _pid_alive
        self._by_pid: dict[int, dict[int, int]] = {}
        self._foreign: dict[int, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, gpus: Iterable[Any]) -> DeclaredInventory:
        """From the config's `gpus:` entries (`GpuConfig`: index, memory, name)."""
        return cls(DeclaredGpu(gpu.index, int(gpu.memory), gpu.name or "declared") for gpu in gpus)

    def set_process_memory(self, pid: int, bytes_per_gpu: Mapping[int, int]) -> None:
        """Record what a process holds on each GPU (replaces any earlier report)."""
        unknown = [index for index in bytes_per_gpu if index not in self._gpus]
        if unknown:
            raise GpuInventoryError(f"GPU {unknown[0]} is not declared")
        with self._lock:
            self._by_pid[pid] = {i: b for i, b in bytes_per_gpu.items() if b}

    def forget_process(self, pid: int) -> None:
        with self._lock:
            self._by_pid.pop(pid, None)

    def set_foreign_bytes(self, index: int, size: int) -> None:
        """Memory on a GPU held by programs that are not engines of ours."""
        if index not in self._gpus:
            raise GpuInventoryError(f"GPU {index} is not declared")
        with self._lock:
            self._foreign[index] = size

    def gpus(self) -> list[GpuInfo]:
        with self._lock:
            reports = dict(self._by_pid)
            foreign = dict(self._foreign)
        used = dict(foreign)
        for pid, held in reports.items():
            if not self._alive(pid):
                continue
            for index, size in held.items():
                used[index] = used.get(index, 0) + size
        return [
            GpuInfo(
                index=gpu.index,
                name=gpu.name,
                total_bytes=gpu.total_bytes,
                used_bytes=used.get(gpu.index, 0),
                free_bytes=max(gpu.total_bytes - used.get(gpu.index, 0), 0),
            )
            for gpu in sorted(self._gpus.values(), key=lambda g: g.index)
        ]

    def process_memory(self, pids: Iterable[int]) -> dict[int, int]:
        tree = {pid for pid in process_trees(pids, self._tree) if self._alive(pid)}
        with self._lock:
            reports = {pid: dict(held) for pid, held in self._by_pid.items() if pid in tree}
        held: dict[int, int] = {}
        for per_gpu in reports.values():
            for index, size in per_gpu.items():
                held[index] = held.get(index, 0) + size
        return held


def _pid_alive(pid: int) -> bool:
    """A zombie has exited and given its GPU memory back, though /proc still lists it."""
    return Path(f"/proc/{pid}").exists() and not is_zombie(pid)
