"""A stand-in for `pynvml` that reads the simulated GPU ledger (tests/fake_gpu.py).

The node agents of a Ray cluster read their GPUs through NVML; on this machine, without GPUs,
each test node points `MODELYARD_NVML_MODULE` at this module and `FAKE_GPU_DIR` at its own
ledger, so the gateway's cluster-wide inventory goes through the real NVML code path
(`NvmlInventory`): device count, memory, and the compute processes with their memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tests import fake_gpu


@dataclass(frozen=True)
class Memory:
    total: int
    used: int
    free: int


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    usedGpuMemory: int


def _ledger() -> Path:
    return Path(os.environ["FAKE_GPU_DIR"])


def nvmlInit() -> None:
    if not (_ledger() / "gpus.json").exists():
        raise RuntimeError("NVML Shared Library Not Found (no simulated GPU ledger)")


def nvmlShutdown() -> None:
    return None


def nvmlDeviceGetCount() -> int:
    return len(fake_gpu.totals(_ledger()))


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    return index


def nvmlDeviceGetName(handle: int) -> str:
    total = fake_gpu.totals(_ledger())[handle]
    return f"Simulated GPU {total // 1024**3} GiB"


def nvmlDeviceGetMemoryInfo(handle: int) -> Memory:
    total = fake_gpu.totals(_ledger())[handle]
    used = fake_gpu.used(_ledger()).get(handle, 0)
    return Memory(total, used, max(total - used, 0))


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[ProcessInfo]:
    return [
        ProcessInfo(pid, held[handle])
        for pid, held in fake_gpu.claims(_ledger()).items()
        if held.get(handle)
    ]
