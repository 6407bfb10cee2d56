"""Engines as local processes: own process group, kept logs, fast readiness, verified stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from modelyard.engines.base import LaunchSpec
from modelyard.proctree import (
    group_members,
    is_zombie,
    listening_inodes,
    process_start_ticks,
    process_tree,
    signal_group,
    socket_holders,
)
from modelyard.redaction import MASK
from modelyard.runtime.logs import EngineLog, pump_lines
from modelyard.runtime.ports import LOCAL_HOST, NoFreePort, PortBook
from modelyard.runtime.registry import ProcessRegistry

# Readiness polling: start fast, back off to a small cap. Any new line of engine output triggers
# an immediate check as well, so a request does not wait for the next poll once the engine says
# it is up (llama-swap polls once a second and adds up to a second to every cold start). The cap
# must stay small: vLLM prints its last line ("Route: ...") before its port opens and nothing
# when it does, so a 0.5 s cap added ~450 ms to real cold starts (bench/cold_start.py). A poll
# of a port that is not open yet costs a refused connection, well under a millisecond.
FIRST_POLL_S = 0.02
MAX_POLL_S = 0.05
POLL_GROWTH = 1.5
HEALTH_REQUEST_TIMEOUT_S = 2.0


class EngineStartError(Exception):
    """The engine did not become ready: it exited, or the deadline passed."""

    def __init__(
        self,
        message: str,
        exit_code: int | None,
        log_tail: list[str],
        timed_out: bool = False,
        node_lost: bool = False,
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = log_tail
        self.timed_out = timed_out  # alive but not ready in time (not a crash)
        # The engine's node was lost under it: not the engine's failure, so it counts toward
        # no back-off, and the start is tried once more elsewhere.
        self.node_lost = node_lost


@dataclass(frozen=True)
class ExitInfo:
    code: int | None
    at: float
    # Gone with its node (a Ray node lost): not a crash of the engine, so no back-off.
    node_lost: bool = False


class EngineProcess:
    """One running engine. Created by `ProcessRuntime.start`; owned by one model's supervisor."""

    node: str | None = None  # on this machine
    actor_name: str | None = None
    remote = False

    def __init__(
        self,
        name: str,
        spec: LaunchSpec,
        port: int,
        process: asyncio.subprocess.Process,
        log: EngineLog,
        registry: ProcessRegistry | None,
        health_session: aiohttp.ClientSession,
    ) -> None:
        self.name = name
        self.spec = spec
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.upstream_headers = spec.upstream_headers
        self.pid = process.pid
        self.started_at = time.monotonic()
        self.log = log
        self._process = process
        self._registry = registry
        self._health_session = health_session
        self._output_seen = asyncio.Event()
        self._told_squatter = False  # the log says once that another program answered
        self._unsubscribe = log.subscribe(lambda _line: self._output_seen.set())
        assert process.stdout is not None
        self._pump = asyncio.create_task(pump_lines(process.stdout, log.append))
        self.exited: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiter = asyncio.create_task(self._wait_exit())

    @property
    def health_path(self) -> str:
        return self.spec.health_path

    def subscribe_log(self, on_line: Callable[[str], None]) -> Callable[[], None]:
        """Call `on_line` with each new output line; returns the unsubscribe function."""
        return self.log.subscribe(on_line)

    async def _wait_exit(self) -> None:
        code = await self._process.wait()
        # Let the output pump drain so the last log lines are there for the error message.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._pump), timeout=1.0)
        if not self.exited.done():
            self.exited.set_result(ExitInfo(code, time.monotonic()))

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def exit_code(self) -> int | None:
        return self.exited.result().code if self.exited.done() else None

    def log_tail(self, count: int) -> list[str]:
        return self.log.tail(count)

    def process_gone(self) -> bool:
        return self.exited.done() or is_zombie(self.pid) or process_start_ticks(self.pid) is None

    async def wait_ready(self, deadline: float) -> float:
        """Wait until the engine answers its health check; returns seconds spent.

        Raises `EngineStartError` at once if the process exits, or when `deadline`
        (a `time.monotonic()` value) passes.
        """
        started = time.monotonic()
        delay = FIRST_POLL_S
        while True:
            if self.exited.done():
                raise self._start_error("exited while starting")
            if await self._is_ready(self._health_session):
                return time.monotonic() - started
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = self._start_error("was not ready before the start timeout")
                error.timed_out = True
                raise error
            self._output_seen.clear()
            output: asyncio.Future[Any] = asyncio.ensure_future(self._output_seen.wait())
            done, _ = await asyncio.wait(
                {output, self.exited},
                timeout=min(delay, remaining),
                return_when=asyncio.FIRST_COMPLETED,
            )
            output.cancel()
            if output not in done:
                delay = min(delay * POLL_GROWTH, MAX_POLL_S)

    async def _is_ready(self, session: aiohttp.ClientSession) -> bool:
        """Its health check answers 200 (and it lists its served name, when expected), and
        what answers is not another program that took its port."""
        timeout = aiohttp.ClientTimeout(total=HEALTH_REQUEST_TIMEOUT_S)
        headers = self.spec.upstream_headers  # an engine started with --api-key wants it
        try:
            async with session.get(
                self.base_url + self.spec.health_path, timeout=timeout, headers=headers
            ) as resp:
                if resp.status != 200:
                    return False
            if self.spec.expect_served_name is not None:
                async with session.get(
                    self.base_url + "/v1/models", timeout=timeout, headers=headers
                ) as resp:
                    if resp.status != 200:
                        return False
                    listing = await resp.json(content_type=None)
                names = {entry.get("id") for entry in listing.get("data", [])}
                if self.spec.expect_served_name not in names:
                    return False
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError):
            return False
        squatter = await asyncio.to_thread(self._another_program_listening)
        if squatter is not None and not self._told_squatter:
            self._told_squatter = True
            self.log.append(
                f"[modelyard] port {self.port} answers, but from another program (pid "
                f"{squatter}, running since before this engine started): not ready"
            )
        return squatter is None

    def _another_program_listening(self) -> int | None:
        """The pid of the program listening on the engine's port, when it is provably not
        the engine: none of the engine's processes, and running since before the engine was
        started (it took the port between the gateway's choice and the engine's bind; the
        engine will fail to bind and exit). What cannot be told here counts as the engine's:
        a listener in another namespace or of another user, or one started after the engine
        (docker-proxy for a `command: docker run -p ...` engine's container)."""
        inodes = listening_inodes(self.port, self.pid)
        born = process_start_ticks(self.pid)
        if not inodes or born is None or socket_holders(inodes, [self.pid]):
            return None  # (most often the engine's own process listens: nothing more to read)
        holders = socket_holders(inodes)
        if not holders or set(holders) & set(process_tree(self.pid)):
            return None
        if all((process_start_ticks(pid) or 0) < born for pid in holders):
            return holders[0]
        return None

    def _start_error(self, what: str) -> EngineStartError:
        code = self.exit_code()
        tail = self.log.tail(20)
        detail = f" (exit code {code})" if code is not None else ""
        return EngineStartError(f"engine for {self.name!r} {what}{detail}", code, tail)

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the whole process group, SIGKILL after `grace`, then verify it is gone."""
        pgid = self.pid
        if self.alive:
            signal_group(pgid, signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), timeout=grace)
        # Children (vLLM's engine core, workers) may outlive the leader: kill what is left.
        if self.alive or group_members(pgid):
            signal_group(pgid, signal.SIGKILL)
        await asyncio.shield(self.exited)
        await wait_group_gone(pgid, timeout=max(grace, 5.0))
        self._unsubscribe()
        self._pump.cancel()
        self.log.close()
        if self._registry is not None:
            self._registry.forget(self.name, self.pid)
        return self.exit_code()

    def kill_now(self) -> None:
        """Last resort on gateway exit: SIGKILL the group without waiting."""
        signal_group(self.pid, signal.SIGKILL)


async def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Poll until no live process is left in the group; SIGKILL stragglers halfway."""
    deadline = time.monotonic() + timeout
    killed = False
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        if not killed and time.monotonic() > deadline - timeout / 2:
            signal_group(pgid, signal.SIGKILL)
            killed = True
        await asyncio.sleep(0.02)
    return True


class ProcessRuntime:
    """Starts engines as child processes, each in its own process group."""

    def __init__(
        self,
        state_dir: Path,
        health_session: aiohttp.ClientSession,
        registry: ProcessRegistry | None = None,
        ports: PortBook | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.registry = registry
        self._health_session = health_session
        self.ports = ports or PortBook()

    async def start(self, name: str, spec_for_port: Callable[[int], LaunchSpec]) -> EngineProcess:
        try:
            port = self.ports.take(LOCAL_HOST)
        except NoFreePort as error:
            raise EngineStartError(f"engine for {name!r} has no port: {error}", None, []) from error
        try:
            engine = await self._start_on(name, spec_for_port(port), port)
        except BaseException:
            self.ports.release(LOCAL_HOST, port)
            raise
        # The port stays the engine's until its process is gone (then it is kept back a while).
        engine.exited.add_done_callback(lambda _exit: self.ports.release(LOCAL_HOST, port))
        return engine

    async def _start_on(self, name: str, spec: LaunchSpec, port: int) -> EngineProcess:
        log = EngineLog(self.state_dir / "logs" / f"{_file_safe(spec.log_name or name)}.log")
        log.append(f"[modelyard] starting: {' '.join(redacted(spec.argv))}")
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: a stop reaches its children too
                limit=1024 * 1024,
            )
        except OSError as error:
            log.append(f"[modelyard] could not start: {error}")
            log.close()
            raise EngineStartError(
                f"engine for {name!r} could not be started: {error}", None, log.tail(5)
            ) from error
        if self.registry is not None:
            self.registry.record(name, process.pid, spec.argv)
        return EngineProcess(name, spec, port, process, log, self.registry, self._health_session)


_SECRET_FLAGS = frozenset({"--api-key", "--hf-token"})


def redacted(argv: list[str]) -> list[str]:
    """The argv with the values of secret flags hidden, for the engine log (also when they
    were written into the config itself, where `redaction` does not know them)."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        flag, sep, _value = arg.partition("=")
        if hide_next:
            shown.append(MASK)
        elif flag in _SECRET_FLAGS and sep:
            shown.append(f"{flag}={MASK}")
        else:
            shown.append(arg)
        hide_next = arg in _SECRET_FLAGS
    return shown


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-#" else "_" for ch in name)
