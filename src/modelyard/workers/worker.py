"""A proxy worker: another process serving the gateway's port (SO_REUSEPORT) with the same
aiohttp server and connection limits. It decides nothing: each request goes to the gateway's
process (the owner) over its Unix socket, through the one pipeline of rules there, and comes
back as a full answer to pass on or as a channel of typed messages (`proxy.worker_messages`): then
the worker keeps its client informed while an engine starts (`api.loading.LoadingStream`) and
relays the request to the engine itself (`proxy.forward`, the same code as the owner's).

Started as `python -I -m modelyard.workers.worker SETTINGS` by `workers.pool`: `-I` keeps the
working directory (and PYTHON* variables) off `sys.path`.
"""

from __future__ import annotations

import signal

# First, before the imports that take a while: a SIGHUP to the process group (a closed
# terminal, a reload) while this worker starts must not kill it. `run` handles it later.
if __name__ == "__main__":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import asyncio
import logging
import os
import sys

from aiohttp import web

from modelyard.api.cors import add_cors_headers
from modelyard.api.http_layer import ConnectionLimits, listen
from modelyard.observability.log_format import configure_logging
from modelyard.proxy.worker_messages import VERSION
from modelyard.tls import ServerCertificate
from modelyard.workers.relay import Worker
from modelyard.workers.settings import WorkerSettings

__all__ = ["WorkerSettings", "main", "run"]

log = logging.getLogger("modelyard.worker")


async def run(settings: WorkerSettings) -> None:
    certificate = (
        ServerCertificate(settings.tls_cert, settings.tls_key)
        if settings.tls_cert and settings.tls_key
        else None
    )
    worker = Worker(settings)

    # Every request, whatever its target (one no route would match too), goes to the owner:
    # a middleware, not a route, so aiohttp's router answers nothing here.
    @web.middleware
    async def to_owner(request: web.Request, handler: object) -> web.StreamResponse:
        return await worker.handle(request)

    app = web.Application(middlewares=[to_owner])
    app.on_response_prepare.append(add_cors_headers)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=settings.shutdown_grace
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The same signals as the gateway's process: SIGTERM and SIGINT drain and stop, SIGHUP
    # reloads what this process holds (the certificate) and never kills it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, certificate)
    limits = ConnectionLimits(head_timeout=settings.head_timeout)
    listener = await listen(
        runner,
        lambda: limits,
        settings.host,
        settings.port,
        ssl_context=certificate.context if certificate is not None else None,
        reuse_port=True,
    )
    orphan_watch = asyncio.ensure_future(_stop_when_orphaned(stop))
    try:
        async with worker.control.post(
            f"http://owner/ready/{settings.name}",
            params={"version": str(VERSION), "pid": str(os.getpid())},
        ) as answer:
            if answer.status != 204:
                log.error("the gateway refused this worker: %s", await answer.text())
                return
        await stop.wait()
    finally:
        orphan_watch.cancel()
        listener.close()  # requests in flight carry on for the grace period
        await _drain(worker, settings.shutdown_grace)
        await runner.cleanup()
        await worker.close()


async def _drain(worker: Worker, grace: float) -> None:
    """As the gateway's process does: one grace period for requests in flight, then streams
    still going end with an error event that says why, not silently."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while worker.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.1)
    if not worker.in_flight:
        return
    worker.upstream.cut_streams(
        f"the gateway is shutting down; this stream was ended after {grace:g}s "
        "(limits.shutdown_grace)"
    )
    deadline = loop.time() + 5.0
    while worker.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.1)


def _reload(certificate: ServerCertificate | None) -> None:
    log.info("SIGHUP: reloading")
    if certificate is not None:
        certificate.reload()


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """The owner gone (killed outright): this worker stops too, leaving no orphan."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.error("the gateway's process is gone: stopping")
    stop.set()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    settings = WorkerSettings.model_validate_json(args[0])
    configure_logging(settings.log_level, settings.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(run(settings))
    else:
        uvloop.run(run(settings))


if __name__ == "__main__":
    main()
