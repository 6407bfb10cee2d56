"""Admin routes: load, unload and sleep models; engine logs; the live event stream."""

from __future__ import annotations

from aiohttp import web

from modelyard.api import live
from modelyard.api.access import principal_of, require_admin
from modelyard.api.errors import ApiError
from modelyard.api.serving import gateway_of
from modelyard.gateway import Gateway
from modelyard.redaction import redact, redact_value
from modelyard.scheduler.supervisor import ModelSupervisor, ModelUnavailable


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/models/{model}/load", load_model)
    router.add_post("/admin/models/{model}/unload", unload_model)
    router.add_post("/admin/models/{model}/sleep", sleep_model)
    router.add_get("/admin/logs/{model}", engine_logs)
    router.add_get("/admin/events", event_stream)


def _admin_supervisor(request: web.Request) -> tuple[Gateway, ModelSupervisor]:
    require_admin(request)
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


def audit(request: web.Request, gateway: Gateway, model: str | None, action: str) -> None:
    """Who asked for what: every admin action is an event carrying the key's name."""
    key = principal_of(request).name
    gateway.events.emit(
        "admin_action", model, f"{action} requested by key {key!r}", key=key, action=action
    )


async def load_model(request: web.Request) -> web.Response:
    gateway, supervisor = _admin_supervisor(request)
    audit(request, gateway, supervisor.name, "load")
    try:
        await gateway.yard.load(
            supervisor.name, reason=f"admin load ({principal_of(request).name})"
        )
    except ModelUnavailable as error:
        raise ApiError(
            error.status, redact(str(error)), error.code, retry_after=error.retry_after
        ) from None
    except Exception as error:
        raise ApiError(
            502, redact(f"model {supervisor.name!r} failed to start: {error}"), "start_failed"
        ) from None
    return web.json_response(redact_value(gateway.model_status(supervisor.name)))


async def unload_model(request: web.Request) -> web.Response:
    gateway, supervisor = _admin_supervisor(request)
    audit(request, gateway, supervisor.name, "unload")
    await supervisor.stop(f"admin unload ({principal_of(request).name})")
    return web.json_response(redact_value(gateway.model_status(supervisor.name)))


async def sleep_model(request: web.Request) -> web.Response:
    gateway, supervisor = _admin_supervisor(request)
    level = request.query.get("level") or str(gateway.yard.model_config(supervisor.name).sleep or 1)
    if level not in ("1", "2"):
        raise ApiError(400, "level must be 1 or 2", "invalid_level", "level")
    audit(request, gateway, supervisor.name, f"sleep level {level}")
    try:
        slept = await supervisor.sleep(int(level), f"admin sleep ({principal_of(request).name})")
    except ModelUnavailable as error:
        raise ApiError(error.status, redact(str(error)), error.code) from None
    if not slept:
        raise ApiError(
            409,
            f"model {supervisor.name!r} is {supervisor.state.value}; only a ready model can sleep",
            "not_ready",
        )
    return web.json_response(redact_value(gateway.model_status(supervisor.name)))


async def engine_logs(request: web.Request) -> web.StreamResponse:
    """The engine's recent output; `?follow=1` streams new lines as SSE."""
    _gateway, supervisor = _admin_supervisor(request)
    return await live.engine_log_response(request, supervisor)


async def event_stream(request: web.Request) -> web.StreamResponse:
    """GET /admin/events: recent events, then new ones live (SSE)."""
    require_admin(request)
    return await live.event_stream_response(request, gateway_of(request))
