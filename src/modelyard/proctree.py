"""Facts about processes read from /proc: start times, process groups, trees."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a pid reuse apart)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] == "Z"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    members = []
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(pid)
    return members


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields:
            children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat_fields(pid) is None:
            continue
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def rss_bytes(pid: int) -> int | None:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# A TCP socket's state in /proc/net/tcp (include/net/tcp_states.h): 0A is LISTEN.
_LISTEN = "0A"


def listening_inodes(port: int, netns_pid: int) -> set[int]:
    """The inodes of the TCP sockets listening on `port`, any address, IPv4 or IPv6, in the
    network namespace of process `netns_pid`."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / str(netns_pid) / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            if (
                len(fields) > 9
                and fields[3] == _LISTEN
                and int(fields[1].rsplit(":")[1], 16) == port
            ):
                inodes.add(int(fields[9]))
    return inodes


def socket_holders(inodes: set[int], pids: list[int] | None = None) -> list[int]:
    """The processes (of `pids`, or all) with a file descriptor on one of these sockets; a
    process whose descriptors cannot be read (another user's) is not counted."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    holders = []
    for pid in pids if pids is not None else _all_pids():
        try:
            descriptors = list((_PROC / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            with contextlib.suppress(OSError):
                if os.readlink(descriptor) in wanted:
                    holders.append(pid)
                    break
    return holders


def _all_pids() -> list[int]:
    """Every process's pid (a process may be gone by the time it is read)."""
    return [int(entry.name) for entry in _PROC.iterdir() if entry.name.isdigit()]
