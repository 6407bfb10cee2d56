"""Live streams (Server-Sent Events): the event feed and an engine's log, for admins.

Both replay what happened before and then stay open. Two rules keep them honest:
nothing is lost or repeated between the replay and the live part (subscribe first, then
replay, then skip what was already sent), and an open stream never holds up a gateway
shutdown (aiohttp waits for running handlers, so `on_shutdown` ends every live stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

from modelyard.api.errors import ApiError
from modelyard.gateway import Gateway
from modelyard.lifecycle import EngineHandle
from modelyard.observability.events import Event
from modelyard.scheduler.scheduler import Scheduler

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx in front not to buffer
}
KEEPALIVE_S = 15.0
# How often a log stream checks whether the model got a new engine (a start after a stop).
ENGINE_CHECK_S = 0.25
MAX_REPLAY = 10_000
LIVE_STREAMS = web.AppKey("live_streams", set[asyncio.Task[Any]])


def install(app: web.Application) -> None:
    """Track live streams so a shutdown can end them instead of waiting for its timeout."""
    app[LIVE_STREAMS] = set()
    app.on_shutdown.append(_end_live_streams)


async def _end_live_streams(app: web.Application) -> None:
    for task in list(app.get(LIVE_STREAMS, ())):
        task.cancel()


@contextlib.contextmanager
def _live(request: web.Request) -> Iterator[None]:
    tasks = request.app.get(LIVE_STREAMS)
    task = asyncio.current_task()
    if tasks is not None and task is not None:
        tasks.add(task)
    try:
        # A client that goes away, or a shutdown, ends the stream; neither is an error.
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            yield
    finally:
        if tasks is not None and task is not None:
            tasks.discard(task)


def sse_frame(data: str, event_id: int | None = None) -> bytes:
    prefix = f"id: {event_id}\n" if event_id is not None else ""
    return f"{prefix}data: {data}\n\n".encode()


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer", f"invalid_{name}", name) from None


def _follow(request: web.Request, default: bool) -> bool:
    raw = request.query.get("follow")
    return default if raw is None else raw.lower() in ("1", "true", "yes")


# ----- events -----


async def event_stream_response(request: web.Request, gateway: Gateway) -> web.StreamResponse:
    """GET /admin/events: past events, then new ones live (SSE; `follow=0` gives JSON).

    `recent=N` replays the last N events (default 50). `Last-Event-ID` (sent by a
    reconnecting EventSource) or `after=ID` replays everything after that id instead, also
    across a gateway restart, since ids and history live in the state dir. `model=NAME`
    keeps one model's events.
    """
    bus = gateway.events
    model = request.query.get("model") or None
    recent = min(max(_int_param(request, "recent", 50), 0), MAX_REPLAY)
    resume = request.headers.get("Last-Event-ID") or request.query.get("after")
    after: int | None = None
    if resume:
        try:
            after = int(resume)
        except ValueError:
            raise ApiError(400, "after must be an event id", "invalid_after", "after") from None
    if not _follow(request, default=True):
        past = await _replay(gateway, after, recent, model)
        return web.json_response({"events": [e.to_json() for e in past], "last_id": bus.last_id()})
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    queue = bus.subscribe()  # before the replay, so nothing falls between the two
    try:
        with _live(request):
            sent = after or 0
            for event in await _replay(gateway, after, recent, model):
                await response.write(sse_frame(json.dumps(event.to_json()), event.id))
                sent = event.id
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event.id <= sent or (model is not None and event.model != model):
                    continue
                await response.write(sse_frame(json.dumps(event.to_json()), event.id))
                sent = event.id
    finally:
        bus.unsubscribe(queue)
    return response


async def _replay(
    gateway: Gateway, after: int | None, recent: int, model: str | None
) -> list[Event]:
    bus = gateway.events
    if after is None or after > bus.last_id():
        # No resume point, or one from a history this gateway does not have (its state dir
        # was wiped): the recent events are the best answer.
        return await bus.recent_off_loop(recent, model)
    return await bus.after_off_loop(after, MAX_REPLAY, model)


# ----- engine logs -----


async def engine_log_response(
    request: web.Request, scheduler: Scheduler, name: str
) -> web.StreamResponse:
    """GET /admin/logs/{model}: the engine's last lines (`lines=N`); `follow=1` streams SSE.

    A followed log keeps going across restarts: when the model gets a new engine (a
    request or the load button started it), that engine's lines follow from its first one,
    so a cold start can be watched from a browser.
    """
    lines = min(max(_int_param(request, "lines", 200), 0), 10_000)
    engine = scheduler.live_engine(name)
    if engine is not None:
        tail = engine.log_tail(lines)
    else:
        # A stopped engine's last lines are kept (a failed start's too) until the next start.
        tail = scheduler.log_tail(name)[-lines:] if lines else []
    if not _follow(request, default=False):
        model = scheduler.model_of_engine(name)
        answer: dict[str, object] = {
            "model": model,
            "state": scheduler.engine_state(name).value,
            "lines": tail,
        }
        if scheduler.model_config(model).replicas.max > 1:
            answer["replica"] = name  # which engine's log: the model's own, or `coder#2`
            answer["replicas"] = scheduler.engine_keys(model)  # each one's, by `replica=N`
        return web.json_response(answer)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    queue: asyncio.Queue[str] = asyncio.Queue(maxsize=5000)

    def on_line(line: str) -> None:
        if not queue.full():  # a reader that cannot keep up loses lines, never blocks engines
            queue.put_nowait(line)

    # Subscribing happens right after reading the tail, with no await between: no line is
    # lost or sent twice.
    followed, unsubscribe = engine, _subscribe(engine, on_line)
    try:
        with _live(request):
            for line in tail:
                await response.write(sse_frame(json.dumps(line)))
            quiet = 0.0
            while True:
                current = scheduler.live_engine(name)
                if current is not None and current is not followed:
                    unsubscribe()
                    backlog = current.log_tail(10_000)
                    followed, unsubscribe = current, _subscribe(current, on_line)
                    for line in backlog:
                        await response.write(sse_frame(json.dumps(line)))
                try:
                    line = await asyncio.wait_for(queue.get(), ENGINE_CHECK_S)
                except TimeoutError:
                    quiet += ENGINE_CHECK_S
                    if quiet >= KEEPALIVE_S:
                        await response.write(b": keep-alive\n\n")
                        quiet = 0.0
                    continue
                quiet = 0.0
                await response.write(sse_frame(json.dumps(line)))
    finally:
        unsubscribe()
    return response


def _subscribe(engine: EngineHandle | None, on_line: Callable[[str], None]) -> Callable[[], None]:
    """Follow an engine's output; returns the unsubscribe function."""
    if engine is None:
        return lambda: None
    return engine.subscribe_log(on_line)
