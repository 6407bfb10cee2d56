"""A record of the engine processes we started, so a restarted gateway can stop orphans.

A gateway killed with SIGKILL cannot stop its engines; they keep holding GPU memory. Each
start is recorded under `state_dir/engines/` with the pid and its kernel start time (so a
reused pid is never mistaken for our engine); the next gateway stops what is still there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from modelyard.proctree import group_members, process_start_ticks, signal_group


@dataclass(frozen=True)
class OrphanReport:
    name: str
    pid: int
    stopped: bool


class ProcessRegistry:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, pid: int) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
        return self.directory / f"{safe}.{pid}.json"

    def record(self, name: str, pid: int, argv: list[str]) -> None:
        entry = {
            "name": name,
            "pid": pid,
            "start_ticks": process_start_ticks(pid),
            "argv0": argv[0] if argv else "",
            "recorded_at": time.time(),
        }
        path = self._path(name, pid)
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(entry))
        os.replace(temp, path)  # atomic: a crash never leaves half a record

    def forget(self, name: str, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name, pid).unlink()

    def stop_orphans(self, grace: float = 5.0) -> list[OrphanReport]:
        """Stop every recorded engine that is still running; clear the records."""
        reports = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                entry = json.loads(path.read_text())
                pid, name = int(entry["pid"]), str(entry["name"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            leader_ticks = process_start_ticks(pid)
            ours = leader_ticks is not None and leader_ticks == entry.get("start_ticks")
            # The group id is the leader's pid (start_new_session). Linux does not reuse a pid
            # while it names a live group, so members of a leaderless group are our children.
            if ours or (leader_ticks is None and group_members(pid)):
                reports.append(OrphanReport(name, pid, _stop_group(pid, grace)))
            path.unlink(missing_ok=True)
        return reports


def _stop_group(pgid: int, grace: float) -> bool:
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_members(pgid):
        signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return not group_members(pgid)
