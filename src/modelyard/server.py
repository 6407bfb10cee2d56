"""Running the gateway: listen, handle signals, shut down cleanly leaving no engine behind."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from modelyard.api.app import build_app
from modelyard.api.http_layer import ConnectionLimits, listen, protocol_factory
from modelyard.api.worker_desk import AdmissionDesk
from modelyard.config.loader import ConfigError
from modelyard.config.schema import GatewayConfig
from modelyard.gateway import Gateway
from modelyard.observability.log_format import configure_logging
from modelyard.process_heap import keep_startup_heap
from modelyard.redaction import register_secrets
from modelyard.tls import ServerCertificate
from modelyard.workers.pool import WorkerPool, serve_control, socket_folder
from modelyard.workers.settings import WorkerSettings

log = logging.getLogger("modelyard")
# The owner's Unix socket for its workers: their pooled connections idle up to a minute.
WORKER_LINK_LIMITS = ConnectionLimits(head_timeout=75.0)

ReloadAction = Callable[[], object]


def run_reload_actions(actions: Sequence[ReloadAction]) -> None:
    """SIGHUP: run every reload action in order; one that fails does not stop the others."""
    log.info("SIGHUP: reloading")
    for action in actions:
        try:
            action()
        except Exception:
            log.exception("reload step %s failed", getattr(action, "__qualname__", action))


class StateDirError(Exception):
    """The state directory cannot be used; the message says why and what to do."""


def state_dir_problem(state_dir: str, create: bool = True) -> str | None:
    """Why the gateway could not keep its state in `state_dir`, or None. With `create`, a
    missing directory is made and a file written; without (for `modelyard check`), nothing
    is changed: the directory, or the nearest folder above it, must be writable."""
    path = Path(state_dir).expanduser()
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        else:
            existing = path
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not existing.is_dir():
                raise NotADirectoryError(20, "not a directory")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(13, "permission denied")
    except OSError as error:
        reason = error.strerror or type(error).__name__
        return (
            f"state_dir {str(path)!r} is not a writable directory ({reason}); the gateway keeps "
            "its logs, process registry and learned state there. Create it with write access "
            "for this user, or set state_dir: to a directory that has it."
        )
    return None


async def run_gateway(
    config: GatewayConfig,
    ready_message: bool = True,
    config_path: str | None = None,
    log_level: str = "INFO",
    file_listen: str | None = None,
) -> None:
    # Secrets from `${env:}` and `env:` are masked in everything the gateway writes from now on.
    register_secrets(config.secret_values())
    problem = state_dir_problem(config.state_dir)
    if problem is not None:
        raise StateDirError(problem)
    # Read before anything starts, so a bad certificate stops `serve` with a clear message.
    certificate = ServerCertificate(config.tls.cert, config.tls.key) if config.tls else None
    gateway = Gateway.create(config)
    gateway.config_path = Path(config_path) if config_path is not None else None
    if file_listen is not None:
        gateway.file_listen = file_listen
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # What SIGHUP reloads (systemd's ExecReload, a closed terminal: by default the signal
    # would kill the gateway and leave its engines running). Each part that can be reloaded
    # adds its action here; the config file first.
    reloads: set[asyncio.Task[None]] = set()

    def reload_config() -> None:
        task = asyncio.create_task(_reload_on_signal(gateway))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    reload_actions: list[ReloadAction] = []
    if gateway.config_path is not None:
        reload_actions.append(reload_config)
    if certificate is not None:
        reload_actions.append(certificate.reload)
    loop.add_signal_handler(signal.SIGHUP, run_reload_actions, reload_actions)
    served: ServedApp | None = None
    workers: Workers | None = None
    try:
        await gateway.start()
        desk = AdmissionDesk() if config.proxy_workers else None
        app = build_app(gateway, desk=desk)
        gateway.reload_hooks.append(_live_settings(log_level))
        served = await serve_app(
            gateway, app, config.host, config.port, certificate, reuse_port=desk is not None
        )
        if desk is not None:
            workers = await start_workers(
                gateway, served, desk, certificate, log_level, config.proxy_workers
            )
        keep_startup_heap()
        if ready_message:
            scheme = "https" if certificate is not None else "http"
            print(
                f"modelyard listening on {scheme}://{config.listen} ({len(config.models)} models)",
                flush=True,
            )
        await stop.wait()
        log.info("shutting down: finishing requests in flight, then stopping engines")
    finally:
        if served is not None:
            served.stop_accepting()  # connections in flight carry on
        if workers is not None:
            # Workers drain their own requests (their finishes come back here) and stop.
            await workers.stop(config.limits.shutdown_grace + 10.0)
        await _finish_requests(gateway, config.limits.shutdown_grace)
        if served is not None:
            await served.close()
        await gateway.close()
        gateway.scheduler.kill_engines_now()  # last resort: nothing is left behind
        log.info("modelyard stopped")


@dataclass
class ServedApp:
    """The app being served: aiohttp's runner and the one listener whose connections aiohttp's
    handler serves (with or without TLS: the same server, the same limits)."""

    runner: web.AppRunner
    listener: asyncio.Server
    port: int  # the port bound (the one asked for, or the one given for port 0)
    # With proxy workers: the same app on the owner's Unix socket, for their requests.
    worker_listener: asyncio.Server | None = None

    def stop_accepting(self) -> None:
        self.listener.close()  # connections in flight carry on

    async def close(self) -> None:
        """After requests are done or cut: stop listening, end aiohttp's connections."""
        self.listener.close()
        if self.worker_listener is not None:
            self.worker_listener.close()
        await self.runner.cleanup()


@dataclass
class Workers:
    pool: WorkerPool
    control: web.AppRunner
    folder: Path

    async def stop(self, timeout: float) -> None:
        await self.pool.wait_stopped(timeout)
        await self.control.cleanup()
        shutil.rmtree(self.folder, ignore_errors=True)


async def start_workers(
    gateway: Gateway,
    served: ServedApp,
    desk: AdmissionDesk,
    certificate: ServerCertificate | None,
    log_level: str,
    count: int,
) -> Workers:
    """`proxy_workers` more processes on the same port (workers.pool); their requests reach
    this app on a Unix socket in a private folder, their finishes a control socket there."""
    folder = socket_folder()
    admission = folder / "admission.sock"
    # Worker connections stay open between requests: not a client's head timeout.
    served.worker_listener = await asyncio.get_running_loop().create_unix_server(
        protocol_factory(served.runner, lambda: WORKER_LINK_LIMITS), str(admission)
    )
    os.chmod(admission, 0o600)  # in a folder of mode 0700 already
    control = await serve_control(desk, folder / "control.sock")
    config = gateway.config
    settings = WorkerSettings(
        name="w",
        host=config.host,
        port=served.port,
        head_timeout=config.limits.head_timeout,
        admission_socket=str(admission),
        control_socket=str(folder / "control.sock"),
        upstream_connect_timeout=config.limits.upstream_connect_timeout,
        upstream_read_timeout=config.limits.upstream_read_timeout,
        shutdown_grace=config.limits.shutdown_grace,
        tls_cert=str(certificate.cert) if certificate is not None else None,
        tls_key=str(certificate.key) if certificate is not None else None,
        log_level=log_level,
        log_format=config.log_format,
    )
    pool = WorkerPool(count, desk, settings)
    workers = Workers(pool, control, folder)
    try:
        await pool.start()
    except BaseException:
        await workers.stop(5.0)
        raise
    return workers


async def serve_app(
    gateway: Gateway,
    app: web.Application,
    host: str,
    port: int,
    certificate: ServerCertificate | None = None,
    reuse_port: bool = False,
) -> ServedApp:
    """Listen on host:port as `modelyard serve` does: aiohttp's server with the connection
    limits of `limits:` and OpenAI-shaped protocol errors, with or without TLS
    (tests/harness.py serves its app with this too, so the tests take a real client's path)."""
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client that goes away cancels its request
        access_log=None,  # requests are logged by the gateway with model and status
        shutdown_timeout=gateway.config.limits.shutdown_grace,
    )
    await runner.setup()
    try:
        context = certificate.context if certificate is not None else None
        listener = await listen(
            runner,
            lambda: ConnectionLimits.from_config(gateway.config.limits),
            host,
            port,
            ssl_context=context,
            reuse_port=reuse_port,  # proxy workers listen on the same port
        )
        bound = int(listener.sockets[0].getsockname()[1]) if listener.sockets else port
        return ServedApp(runner, listener, bound)
    except BaseException:
        await runner.cleanup()
        raise


async def _finish_requests(gateway: Gateway, grace: float) -> None:
    """One grace period for requests in flight (not two, as once); streams still going after
    it end with a final SSE error event instead of being cut silently (issue 11, defect 7).
    """
    gateway.scheduler.begin_shutdown()
    if await gateway.scheduler.drained(grace):
        return
    reason = (
        f"the gateway is shutting down; this stream was ended after {grace:g}s "
        "(limits.shutdown_grace)"
    )
    cut = gateway.upstream.cut_streams(reason)
    log.warning("shutdown: ended %d streams still running after %gs", cut, grace)
    await gateway.scheduler.drained(5.0)


async def _reload_on_signal(gateway: Gateway) -> None:
    try:
        report = await gateway.reload()
    except ConfigError as error:
        log.error("reload refused; the running configuration is unchanged:\n%s", error)
        return
    except Exception:
        log.exception("reload failed")
        return
    log.info(
        "reloaded %s: %d change(s)%s",
        report.file,
        len(report.plan.changes),
        "".join(f"\n  {c.what} {c.model or ''}: {c.detail}" for c in report.plan.changes),
    )


def _live_settings(log_level: str) -> Callable[[GatewayConfig], None]:
    """What a reload changes outside the gateway's parts: the log format. (The body limit is
    read from the gateway's config for each request, by `api.bodies.read_body`.)"""

    def apply(config: GatewayConfig) -> None:
        configure_logging(log_level, config.log_format)

    return apply


def serve(
    config: GatewayConfig,
    config_path: str | None = None,
    log_level: str = "INFO",
    file_listen: str | None = None,
) -> None:
    """Run the gateway until SIGTERM or SIGINT. `file_listen` is the config file's own
    `listen` when --host or --port replaced it, so a reload compares like with like."""
    main = run_gateway(
        config, config_path=config_path, log_level=log_level, file_listen=file_listen
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        asyncio.run(main)
    else:
        uvloop.run(main)
