"""Helpers for tests that run real vLLM engines on CPU through a real `modelyard serve`.

Two rules keep these tests sane on a 2-core machine that other test runs share:

- one vLLM engine at a time, machine-wide: `engine_turn()` takes a lock file that every test
  module (and the benchmarks) holding engines takes, then waits for stray vLLM processes of
  runs that do not take it;
- no leaked engines: `ProcessWatch` remembers every process of every engine the gateway ran
  (the pid from `/gateway/status` and its process tree) and checks they are all gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelyard.config import load_config
from modelyard.demo import DemoSetup, demo_config_path, write_adapters
from modelyard.proctree import group_members, process_start_ticks, process_tree
from tests.conftest import RunningGateway, processes_with, start_gateway

LOCK_PATH = Path(tempfile.gettempdir()) / "modelyard-vllm-engine.lock"
"""Held by whoever runs vLLM engines in tests or benchmarks on this machine."""

# Command-line fragments of a vLLM engine (the API server and its EngineCore child, which
# renames itself `VLLM::EngineCore`).
VLLM_MARKERS = ("modelyard-vllm", "vllm.entrypoints", "VLLM::", "/bin/vllm ")
STRAY_WAIT_S = 300.0


def vllm_processes() -> list[int]:
    """Live vLLM engine processes on this machine (any owner, any run)."""
    return processes_with(*VLLM_MARKERS)


@contextlib.contextmanager
def engine_turn(wait_s: float = 1800.0) -> Iterator[None]:
    """Hold the machine-wide vLLM lock; then wait (a while) for strays to go away."""
    with LOCK_PATH.open("a") as lock:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{LOCK_PATH} was held for {wait_s:.0f} s") from None
                if not told:
                    print(f"waiting for another run's vLLM engines ({LOCK_PATH})", flush=True)
                    told = True
                time.sleep(1.0)
        strays_deadline = time.monotonic() + STRAY_WAIT_S
        while vllm_processes() and time.monotonic() < strays_deadline:
            time.sleep(1.0)  # an engine of a run that does not take the lock
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class ProcessWatch:
    """Every engine process seen, by (pid, start time), so pid reuse is not mistaken."""

    seen: dict[int, int | None] = field(default_factory=dict)
    groups: set[int] = field(default_factory=set)

    def note(self, pid: int) -> list[int]:
        """Remember an engine's leader and its live process tree; returns the tree."""
        tree = process_tree(pid)
        self.groups.add(pid)  # engines run in their own process group, led by the pid
        for member in tree:
            self.seen.setdefault(member, process_start_ticks(member))
        return tree

    def note_gateway(self, gateway: RunningGateway) -> None:
        for model in gateway.status()["models"]:
            if model["pid"]:
                self.note(int(model["pid"]))

    def alive(self, pids: list[int] | None = None) -> list[int]:
        """Those of `pids` (default: all seen) still running, and any member of their groups."""
        chosen = self.seen if pids is None else {p: self.seen.get(p) for p in pids}
        left = []
        for pid, ticks in chosen.items():
            now = process_start_ticks(pid)
            if now is not None and now == ticks and not _zombie(pid):
                left.append(pid)
        groups = self.groups if pids is None else self.groups & set(pids)
        for pgid in groups:
            left += [p for p in group_members(pgid) if p not in left]
        return sorted(left)

    def wait_gone(self, pids: list[int] | None = None, timeout: float = 30.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while (left := self.alive(pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left


def _zombie(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def demo_document(setup: DemoSetup) -> dict[str, Any]:
    """The demo config as the file sets it (validated first), ready to adjust and write out."""
    config = load_config(demo_config_path(), {**os.environ, **setup.environ})
    document: dict[str, Any] = config.model_dump(mode="json", exclude_unset=True)
    return document


def start_demo_gateway(
    directory: Path, setup: DemoSetup, document: dict[str, Any]
) -> RunningGateway:
    """`modelyard serve` on an adjusted demo config (listen and state_dir are set here)."""
    directory.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in document.items() if k not in ("listen", "state_dir", "models")}
    return start_gateway(directory, document["models"], **settings)


def stop_gateway(gateway: RunningGateway, watch: ProcessWatch) -> None:
    """Stop the gateway; fail if any engine process it ever ran is still there."""
    with contextlib.suppress(Exception):
        watch.note_gateway(gateway)
    if gateway.process.poll() is None:
        gateway.stop(timeout=60)
    left = watch.wait_gone(timeout=30)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    assert not left, f"engine processes left after the gateway stopped: {left}"


def cached_adapters(setup: DemoSetup, names: list[str], **options: Any) -> dict[str, Path]:
    """Test adapters, written once per machine under the demo home and reused afterwards."""
    cache = setup.home.root / "test-adapters" / str(options.get("base", "smollm2")).split("/")[-1]
    paths = write_adapters(cache, names, setup=setup, **options)
    return {path.name: path for path in paths}


def copy_adapter(source: Path, folder: Path, name: str | None = None) -> Path:
    """Copy an adapter folder in, atomically: a scan never sees it half-written."""
    target = folder / (name or source.name)
    staging = folder.parent / f".staging-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    staging.rename(target)
    return target
