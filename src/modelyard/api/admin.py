"""Admin routes: load, unload and sleep models; engine logs; the live event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from modelyard.api.errors import ApiError
from modelyard.api.principal import principal_of
from modelyard.api.serving import gateway_of
from modelyard.gateway import Gateway
from modelyard.scheduler.supervisor import ModelSupervisor, ModelUnavailable

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
KEEPALIVE_S = 15.0
T = TypeVar("T")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/models/{model}/load", load_model)
    router.add_post("/admin/models/{model}/unload", unload_model)
    router.add_post("/admin/models/{model}/sleep", sleep_model)
    router.add_get("/admin/logs/{model}", engine_logs)
    router.add_get("/admin/events", event_stream)


def _admin_supervisor(request: web.Request) -> tuple[Gateway, ModelSupervisor]:
    principal_of(request).require_admin()
    gateway = gateway_of(request)
    name = request.match_info["model"]
    supervisor = gateway.yard.supervisors.get(name)
    if supervisor is None:
        raise ApiError(
            404,
            f"model {name!r} does not exist; known: " + ", ".join(gateway.yard.supervisors),
            "model_not_found",
        )
    return gateway, supervisor


async def load_model(request: web.Request) -> web.Response:
    gateway, supervisor = _admin_supervisor(request)
    try:
        await gateway.yard.load(
            supervisor.name, reason=f"admin load ({principal_of(request).name})"
        )
    except ModelUnavailable as error:
        raise ApiError(
            error.status, str(error), error.code, retry_after=error.retry_after
        ) from None
    except Exception as error:
        raise ApiError(
            502, f"model {supervisor.name!r} failed to start: {error}", "start_failed"
        ) from None
    return web.json_response(gateway.yard.model_status(supervisor.name))


async def unload_model(request: web.Request) -> web.Response:
    gateway, supervisor = _admin_supervisor(request)
    await supervisor.stop(f"admin unload ({principal_of(request).name})")
    return web.json_response(gateway.yard.model_status(supervisor.name))


async def sleep_model(request: web.Request) -> web.Response:
    gateway, supervisor = _admin_supervisor(request)
    level = request.query.get("level") or str(gateway.yard.model_config(supervisor.name).sleep or 1)
    if level not in ("1", "2"):
        raise ApiError(400, "level must be 1 or 2", "invalid_level", "level")
    try:
        slept = await supervisor.sleep(int(level), f"admin sleep ({principal_of(request).name})")
    except ModelUnavailable as error:
        raise ApiError(error.status, str(error), error.code) from None
    if not slept:
        raise ApiError(
            409,
            f"model {supervisor.name!r} is {supervisor.state.value}; only a ready model can sleep",
            "not_ready",
        )
    return web.json_response(gateway.yard.model_status(supervisor.name))


async def engine_logs(request: web.Request) -> web.StreamResponse:
    """The engine's recent output; `?follow=1` streams new lines as SSE."""
    _gateway, supervisor = _admin_supervisor(request)
    try:
        lines = int(request.query.get("lines", "200"))
    except ValueError:
        raise ApiError(400, "lines must be an integer", "invalid_lines", "lines") from None
    engine = supervisor.engine
    tail = (
        engine.log_tail(lines)
        if engine
        else (supervisor.failure.log_tail if supervisor.failure else [])
    )
    if request.query.get("follow") not in ("1", "true"):
        return web.json_response({"model": supervisor.name, "lines": tail})
    log = getattr(engine, "log", None)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    for line in tail:
        await response.write(f"data: {json.dumps(line)}\n\n".encode())
    if log is None:
        return response
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)

    def on_line(line: str) -> None:
        if not queue.full():
            queue.put_nowait(line)

    unsubscribe = log.subscribe(on_line)
    try:
        await _pump_sse(response, queue, lambda line: json.dumps(line))
    finally:
        unsubscribe()
    return response


async def event_stream(request: web.Request) -> web.StreamResponse:
    """GET /admin/events: recent events, then new ones live (SSE)."""
    principal_of(request).require_admin()
    gateway = gateway_of(request)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    queue = gateway.events.subscribe()
    try:
        after = int(request.query.get("after", "0") or 0)
    except ValueError:
        after = 0
    try:
        for event in gateway.events.recent(int(request.query.get("recent", "50") or 50)):
            if event.id > after:
                await response.write(_sse_event(event.id, json.dumps(event.to_json())))
        await _pump_sse(response, queue, lambda e: json.dumps(e.to_json()), id_of=lambda e: e.id)
    finally:
        gateway.events.unsubscribe(queue)
    return response


def _sse_event(event_id: int | None, data: str) -> bytes:
    prefix = f"id: {event_id}\n" if event_id is not None else ""
    return f"{prefix}data: {data}\n\n".encode()


async def _pump_sse(
    response: web.StreamResponse,
    queue: asyncio.Queue[T],
    encode: Callable[[T], str],
    id_of: Callable[[T], int] | None = None,
) -> None:
    with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            await response.write(_sse_event(id_of(item) if id_of else None, encode(item)))
