"""Admin routes: load, unload and sleep models; engine logs; the live event stream."""

from __future__ import annotations

from aiohttp import web

from modelyard.api import live
from modelyard.api.access import principal_of, require_admin
from modelyard.api.errors import ApiError, unavailable
from modelyard.api.serving import gateway_of
from modelyard.gateway import Gateway
from modelyard.redaction import redact_value
from modelyard.scheduler.scaling import replica_key
from modelyard.scheduler.supervisor import ModelUnavailable


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/models/{model}/load", load_model)
    router.add_post("/admin/models/{model}/unload", unload_model)
    router.add_post("/admin/models/{model}/sleep", sleep_model)
    router.add_get("/admin/logs/{model}", engine_logs)
    router.add_get("/admin/events", event_stream)


def _admin_model(request: web.Request) -> tuple[Gateway, str]:
    require_admin(request)
    gateway = gateway_of(request)
    name = request.match_info["model"]
    if name not in gateway.scheduler.models():
        raise ApiError(
            404,
            f"model {name!r} does not exist; known: " + ", ".join(gateway.scheduler.models()),
            "model_not_found",
        )
    return gateway, name


def audit(request: web.Request, gateway: Gateway, model: str | None, action: str) -> None:
    """Who asked for what: every admin action is an event carrying the key's name."""
    key = principal_of(request).name
    gateway.events.emit(
        "admin_action", model, f"{action} requested by key {key!r}", key=key, action=action
    )


async def load_model(request: web.Request) -> web.Response:
    gateway, name = _admin_model(request)
    audit(request, gateway, name, "load")
    try:
        await gateway.scheduler.load(name, reason=f"admin load ({principal_of(request).name})")
    except ModelUnavailable as error:
        raise unavailable(error) from None
    return web.json_response(redact_value(gateway.model_status(name)))


async def unload_model(request: web.Request) -> web.Response:
    gateway, name = _admin_model(request)
    audit(request, gateway, name, "unload")
    await gateway.scheduler.unload(name, f"admin unload ({principal_of(request).name})")
    return web.json_response(redact_value(gateway.model_status(name)))


async def sleep_model(request: web.Request) -> web.Response:
    gateway, name = _admin_model(request)
    scheduler = gateway.scheduler
    level = request.query.get("level") or str(scheduler.model_config(name).sleep or 1)
    if level not in ("1", "2"):
        raise ApiError(400, "level must be 1 or 2", "invalid_level", "level")
    audit(request, gateway, name, f"sleep level {level}")
    try:
        slept = await scheduler.sleep(
            name, int(level), f"admin sleep ({principal_of(request).name})"
        )
    except ModelUnavailable as error:
        raise unavailable(error) from None
    if not slept:
        raise ApiError(
            409,
            f"model {name!r} is {scheduler.state_of(name).value}; only a ready model can sleep",
            "not_ready",
        )
    return web.json_response(redact_value(gateway.model_status(name)))


async def engine_logs(request: web.Request) -> web.StreamResponse:
    """The engine's recent output; `?follow=1` streams new lines as SSE. `?replica=N` picks
    the model's engine N (`coder#2`; 1, the default, is the model's own engine)."""
    gateway, name = _admin_model(request)
    number = request.query.get("replica", "1")
    key = replica_key(name, int(number)) if number.isdigit() and int(number) >= 1 else None
    if key is None or not gateway.scheduler.has_engine_key(key):
        keys = gateway.scheduler.engine_keys(name)
        raise ApiError(
            404,
            f"model {name!r} has no engine {number!r}; its engines: " + ", ".join(keys),
            "replica_not_found",
        )
    return await live.engine_log_response(request, gateway.scheduler, key)


async def event_stream(request: web.Request) -> web.StreamResponse:
    """GET /admin/events: recent events, then new ones live (SSE)."""
    require_admin(request)
    return await live.event_stream_response(request, gateway_of(request))
