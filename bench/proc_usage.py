"""CPU time and memory of a process tree, read from /proc (Linux), for the proxy benchmark.

CPU is utime + stime of every thread of every process in the tree, so a proxy is charged for
all its workers and threads; processes that are not the proxy (engines the gateway started,
which are its children) are left out by a predicate on their command line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree(root: int, exclude: Callable[[str], bool] = lambda _cmd: False) -> list[int]:
    """`root` and its descendants, without any process (and its subtree) that `exclude`s."""
    children = children_of()
    found: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid != root and exclude(cmdline(pid)):
            continue
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def user_and_system_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of the processes (each with all its threads)."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            user += int(fields[11])  # utime (field 14)
            system += int(fields[12])  # stime (field 15)
    return user / _TICK, system / _TICK


def cpu_seconds(pids: list[int]) -> float:
    user, system = user_and_system_seconds(pids)
    return user + system


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return total


class ProcessTree:
    """A proxy's processes, found afresh at each reading (workers may come and go)."""

    def __init__(self, root: int, exclude: Callable[[str], bool] = lambda _cmd: False) -> None:
        self.root = root
        self._exclude = exclude

    def pids(self) -> list[int]:
        return tree(self.root, self._exclude)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def pin(self, cpus: str) -> None:
        """Pin every thread of every process to `cpus` (taskset's list syntax, e.g. "0")."""
        for pid in self.pids():
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):  # the thread ended meanwhile
                    os.sched_setaffinity(int(tid), _cpu_list(cpus))


def _cpu_list(cpus: str) -> set[int]:
    found: set[int] = set()
    for part in cpus.split(","):
        if "-" in part:
            low, high = part.split("-")
            found.update(range(int(low), int(high) + 1))
        else:
            found.add(int(part))
    return found
