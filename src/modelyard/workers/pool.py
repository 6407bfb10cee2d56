"""The owner's proxy workers (`proxy_workers:`): started with `python -I` (the working
directory never on `sys.path`), in the gateway's process group (a SIGHUP to the group
reaches them all, and each handles it as the gateway does), restarted when one dies,
stopped with the gateway. A worker also stops by itself when the gateway's process is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from modelyard.api.worker_desk import AdmissionDesk
from modelyard.workers.settings import WorkerSettings

log = logging.getLogger("modelyard.workers")

START_TIMEOUT_S = 30.0
RESTART_DELAY_S = 1.0


def socket_folder() -> Path:
    """A folder only this user may enter (mkdtemp: mode 0700) for the owner's sockets: short
    enough for a Unix socket's path, whatever the state directory's is."""
    return Path(tempfile.mkdtemp(prefix="modelyard-workers-"))


class WorkerPool:
    def __init__(self, count: int, desk: AdmissionDesk, settings: WorkerSettings) -> None:
        self.count = count
        self.desk = desk
        self.settings = settings
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.stopping = False
        self._watches: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await asyncio.gather(*(self._start(f"w{index}") for index in range(self.count)))

    async def _start(self, name: str) -> None:
        ready = asyncio.get_running_loop().create_future()
        self.desk.ready[name] = ready
        settings = self.settings.model_copy(update={"name": name})
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-m", "modelyard.workers.worker", settings.model_dump_json()
        )
        self.processes[name] = process
        exited = asyncio.ensure_future(process.wait())
        done, _ = await asyncio.wait(
            {ready, exited}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if ready not in done:
            exited.cancel()
            if process.returncode is None:
                process.kill()
            raise RuntimeError(f"proxy worker {name} did not start (exit {process.returncode})")
        watch = asyncio.ensure_future(self._watch(name, process, exited))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        log.info("proxy worker %s serving (pid %d)", name, process.pid)

    async def _watch(
        self, name: str, process: asyncio.subprocess.Process, exited: asyncio.Future[int]
    ) -> None:
        code = await exited
        if self.stopping:
            return
        log.error(
            "proxy worker %s (pid %d) exited with %s: its requests in flight are logged as "
            "502; starting another",
            name,
            process.pid,
            code,
        )
        await asyncio.sleep(RESTART_DELAY_S)
        if not self.stopping:
            try:
                await self._start(name)
            except (RuntimeError, OSError) as error:
                log.error("proxy worker %s not restarted: %s", name, error)

    def stop_accepting(self) -> None:
        """SIGTERM: each worker stops listening and drains its requests."""
        self.stopping = True
        for process in self.processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)

    async def wait_stopped(self, timeout: float) -> None:
        """Every worker gone; one still running after `timeout` is killed."""
        self.stop_accepting()
        for name, process in self.processes.items():
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.error("proxy worker %s did not stop in time: killed", name)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for watch in list(self._watches):
            watch.cancel()


async def serve_control(desk: AdmissionDesk, path: Path) -> web.AppRunner:
    """The owner's control socket: workers say they are ready and post their `Finish`."""
    runner = web.AppRunner(desk.control_app(), access_log=None)
    await runner.setup()
    site = web.UnixSite(runner, str(path))
    await site.start()
    os.chmod(path, 0o600)  # in a folder of mode 0700 already
    return runner
