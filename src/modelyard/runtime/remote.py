"""Engines that run elsewhere (`engine: remote`): connected to, never started or stopped.

The handle looks like a process engine to the supervisor: "starting" checks that the server
answers its health path, "stopping" forgets it, and it never exits on its own. A server that
does not answer is reported as unavailable (503 with Retry-After), not as a failed start:
nothing here can fix it, and the client should simply come back later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from modelyard.engines.base import LaunchSpec
from modelyard.runtime.logs import EngineLog
from modelyard.runtime.process import ExitInfo

# A running server answers at once: a few tries over this long, then the client is told to
# come back (a remote that is down must not hold requests for the whole start timeout).
CONNECT_WINDOW_S = 2.0
RETRY_AFTER_S = 5.0
HEALTH_TIMEOUT_S = 2.0


class RemoteUnavailable(Exception):
    """The remote server did not answer its health check; a 503 with Retry-After."""

    status = 503
    code = "remote_unavailable"
    retry_after = RETRY_AFTER_S

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.exit_code = None
        self.log_tail = log_tail


class RemoteEndpoint:
    """One remote OpenAI-compatible server as the supervisor sees it."""

    def __init__(
        self, name: str, spec: LaunchSpec, log: EngineLog, session: aiohttp.ClientSession
    ) -> None:
        assert spec.remote_url is not None
        self.name = name
        self.spec = spec
        self.base_url = spec.remote_url
        self.pid = 0  # no process of ours
        self.log = log
        self._session = session
        self.exited: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    port = 0  # no port of ours either
    node: str | None = None
    actor_name: str | None = None
    remote = True  # not ours: losing it is no crash of ours

    @property
    def upstream_headers(self) -> dict[str, str]:
        return self.spec.upstream_headers

    @property
    def health_path(self) -> str:
        return self.spec.health_path

    def log_tail(self, count: int) -> list[str]:
        return self.log.tail(count)

    def subscribe_log(self, on_line: Callable[[str], None]) -> Callable[[], None]:
        return self.log.subscribe(on_line)

    def process_gone(self) -> bool:
        return False

    def exit_code(self) -> int | None:
        return None

    def kill_now(self) -> None:
        """Nothing to kill: the server is not ours."""

    async def wait_ready(self, deadline: float) -> float:
        """Check that the server answers; raises `RemoteUnavailable` if it does not."""
        started = time.monotonic()
        give_up = min(deadline, started + CONNECT_WINDOW_S)
        problem = "no answer"
        delay = 0.05
        while True:
            problem = await self._check()
            if not problem:
                self.log.append(f"[modelyard] remote engine at {self.base_url} answers")
                return time.monotonic() - started
            if time.monotonic() + delay > give_up:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        self.log.append(f"[modelyard] remote engine at {self.base_url} is down: {problem}")
        raise RemoteUnavailable(
            f"remote engine for {self.name!r} at {self.base_url} is not answering ({problem}); "
            f"the gateway does not start remote engines: retry in {RETRY_AFTER_S:.0f}s",
            self.log.tail(5),
        )

    async def _check(self) -> str:
        return await health_problem(self._session, self.spec)

    async def stop(self, grace: float) -> int | None:
        """Forget the server (it keeps running: it is not ours)."""
        if not self.exited.done():
            self.exited.set_result(ExitInfo(None, time.monotonic()))
        self.log.append(f"[modelyard] disconnected from remote engine at {self.base_url}")
        self.log.close()
        return None


async def health_problem(session: aiohttp.ClientSession, spec: LaunchSpec) -> str:
    """Why the remote server does not pass its health check ('' when it does)."""
    assert spec.remote_url is not None
    try:
        async with session.get(
            spec.remote_url + spec.health_path,
            headers=spec.upstream_headers,
            timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S),
        ) as response:
            if response.status == 200:
                return ""
            return f"GET {spec.health_path} answered {response.status}"
    except TimeoutError:
        return f"GET {spec.health_path} timed out"
    except aiohttp.ClientError as error:
        return f"{type(error).__name__}: {error}"


async def remote_answers(session: aiohttp.ClientSession, spec: LaunchSpec) -> bool:
    return not await health_problem(session, spec)


class RemoteConnector:
    """The `start` of remote engines: a health check, no process."""

    def __init__(self, state_dir: Path, session: aiohttp.ClientSession) -> None:
        self._state_dir = state_dir
        self._session = session

    async def start(self, name: str, spec_for_port: Callable[[int], LaunchSpec]) -> RemoteEndpoint:
        spec = spec_for_port(0)
        log = EngineLog(self._state_dir / "logs" / f"{_file_safe(spec.log_name or name)}.log")
        log.append(f"[modelyard] connecting to remote engine at {spec.remote_url}")
        return RemoteEndpoint(name, spec, log, self._session)


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-#" else "_" for ch in name)
