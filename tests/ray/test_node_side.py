"""The node side without a cluster: orphan finding, stopping, and the engine's bind address."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types

import pytest

from modelyard.proctree import process_start_ticks
from modelyard.runtime.ports import OFFERS, PortBook
from modelyard.runtime.process import EngineStartError
from modelyard.runtime.ray.engine import RayRuntime, bind_to
from modelyard.runtime.ray.node_side import (
    ENGINE_MARKER,
    OWNER_MARKER,
    find_orphans,
    stop_pids,
)


def engine_like(owner: str, *, ignore_term: bool = False) -> subprocess.Popen[bytes]:
    code = "import signal, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "time.sleep(60)\n"
    env = {**os.environ, ENGINE_MARKER: "ns/model-x", OWNER_MARKER: owner}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


@pytest.fixture
def spawned():
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def wait_visible(pid: int) -> None:
    # The environment is readable once the child has exec'd.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            if f"{ENGINE_MARKER}=".encode() in environ.read():
                return
        time.sleep(0.02)


def test_an_engine_whose_actor_worker_is_gone_is_an_orphan_and_is_stopped(spawned):
    me = f"{os.getpid()}:{process_start_ticks(os.getpid())}"
    owned = engine_like(me)  # its owner (this process) is alive: not an orphan
    # Owners that cannot be alive: a dead pid, a live pid with another start time (reused),
    # and crafted values that name no process at all.
    orphans = [
        engine_like("999999999:1"),
        engine_like(f"{os.getpid()}:1", ignore_term=True),  # also shrugs off SIGTERM
        engine_like("not-a-pid:x"),
        engine_like(""),
    ]
    spawned += [owned, *orphans]
    for process in spawned:
        wait_visible(process.pid)
    found = {pid: name for pid, name in find_orphans()}
    assert {p.pid for p in orphans} <= set(found)
    assert owned.pid not in found
    assert found[orphans[0].pid] == "ns/model-x"
    left = stop_pids([p.pid for p in orphans], grace=0.5)
    assert left == []
    for process in orphans:
        assert process.wait(timeout=5) is not None
    assert owned.poll() is None


def test_stop_pids_never_signals_a_reused_pid():
    # A pid that is not running (or that names another process later) is left alone.
    assert stop_pids([999999999], grace=0.1) == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--host", "127.0.0.1"], ["--host", "10.0.0.7"]),
        (["--host=127.0.0.1"], ["--host=10.0.0.7"]),
        (["--listen", "127.0.0.1:8123"], ["--listen", "10.0.0.7:8123"]),
        (["--host", "{host}", "--port", "9"], ["--host", "10.0.0.7", "--port", "9"]),
        # Look-alikes are not the loopback address: left as they are.
        (["127.0.0.10", "1127.0.0.1", "127.0.0.1.5"], ["127.0.0.10", "1127.0.0.1", "127.0.0.1.5"]),
        (["--prompt", "hello"], ["--prompt", "hello"]),
    ],
)
def test_engines_bind_the_node_address(argv, expected):
    assert bind_to(argv, "10.0.0.7") == expected


class PortOffers:
    """An engine's actor whose `where` offers these ports on one node, in turn."""

    def __init__(self, *ports: int) -> None:
        self._ports = iter(ports)
        self.where = self

    async def remote(self) -> dict[str, object]:
        return {"ip": "10.0.0.2", "port": next(self._ports)}


async def test_a_node_port_an_engine_of_ours_holds_is_asked_for_again() -> None:
    # Two engines started on one node within an engine's bind time can be offered one port by
    # that node's kernel, as on one machine (tests/reliability/test_engine_ports.py): the
    # gateway asks the actor again until the port is none of its engines'.
    book = PortBook()
    assert book.claim("10.0.0.2", 40001)
    runtime = types.SimpleNamespace(ports=book)  # what `_own_port` uses of the runtime
    actor = PortOffers(40001, 40003)
    first = {"ip": "10.0.0.2", "port": 40001}
    where = await RayRuntime._own_port(runtime, actor, first)  # type: ignore[arg-type]
    assert where["port"] == 40003
    assert book.holds("10.0.0.2", 40003)

    stubborn = PortOffers(*[40001] * OFFERS)
    with pytest.raises(EngineStartError, match="offered no port"):
        await RayRuntime._own_port(runtime, stubborn, first)  # type: ignore[arg-type]
