"""A simulated GPU shared by test engines: a ledger of the memory each process claims.

It stands in for a real GPU's allocator as the gateway's placement sees it through NVML:
each test engine claims bytes on the GPUs in its CUDA_VISIBLE_DEVICES (vLLM takes
`--gpu-memory-utilization` x total), and a claim that would exceed a GPU's total fails
the way a real engine does ("CUDA out of memory"). Claims of dead processes are ignored, as
the driver frees a process's memory when it exits. The ledger also keeps the highest total
ever claimed per GPU, so a test can prove the gateway never over-committed.

Layout: DIR/gpus.json {"0": total_bytes, ...}; DIR/claims/<pid>.json {"0": bytes, ...};
DIR/peak.json {"0": bytes}. A lock file serialises updates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path


class OutOfMemory(Exception):
    pass


# Pids of in-process test engines (tests/harness.py) that hold claims: no such process exists,
# so they count as alive until the engine exits and releases its claim.
IN_PROCESS: set[int] = set()


def release(directory: Path, pid: int) -> None:
    """The engine exited: the driver frees its memory."""
    IN_PROCESS.discard(pid)
    with _locked(directory), contextlib.suppress(FileNotFoundError):
        (directory / "claims" / f"{pid}.json").unlink()


def create(directory: Path, totals: dict[int, int]) -> None:
    (directory / "claims").mkdir(parents=True, exist_ok=True)
    (directory / "gpus.json").write_text(json.dumps({str(k): v for k, v in totals.items()}))
    (directory / "peak.json").write_text(json.dumps({str(k): 0 for k in totals}))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with (directory / "lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    if pid in IN_PROCESS:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def totals(directory: Path) -> dict[int, int]:
    return {int(k): v for k, v in json.loads((directory / "gpus.json").read_text()).items()}


def claims(directory: Path) -> dict[int, dict[int, int]]:
    """Live claims: pid -> {gpu: bytes}."""
    result = {}
    for path in (directory / "claims").glob("*.json"):
        pid = int(path.stem)
        if _alive(pid):
            with contextlib.suppress(ValueError, OSError):
                result[pid] = {int(k): v for k, v in json.loads(path.read_text()).items()}
    return result


def used(directory: Path) -> dict[int, int]:
    usage = dict.fromkeys(totals(directory), 0)
    for claim in claims(directory).values():
        for gpu, size in claim.items():
            usage[gpu] = usage.get(gpu, 0) + size
    return usage


def peak(directory: Path) -> dict[int, int]:
    return {int(k): v for k, v in json.loads((directory / "peak.json").read_text()).items()}


def claim(directory: Path, pid: int, bytes_per_gpu: dict[int, int]) -> None:
    """Set this process's claim; raises OutOfMemory (and claims nothing) if it cannot fit."""
    with _locked(directory):
        limits = totals(directory)
        usage = {gpu: 0 for gpu in limits}
        for other, claim_ in claims(directory).items():
            if other != pid:
                for gpu, size in claim_.items():
                    usage[gpu] += size
        for gpu, size in bytes_per_gpu.items():
            if usage[gpu] + size > limits[gpu]:
                raise OutOfMemory(
                    f"CUDA out of memory: tried to allocate {size} bytes on GPU {gpu}; "
                    f"{limits[gpu] - usage[gpu]} bytes free of {limits[gpu]}"
                )
        path = directory / "claims" / f"{pid}.json"
        path.write_text(json.dumps({str(k): v for k, v in bytes_per_gpu.items()}))
        highest = peak(directory)
        for gpu, size in bytes_per_gpu.items():
            highest[gpu] = max(highest.get(gpu, 0), usage[gpu] + size)
        (directory / "peak.json").write_text(json.dumps({str(k): v for k, v in highest.items()}))
