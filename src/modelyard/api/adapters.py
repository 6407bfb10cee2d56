"""Admin routes for LoRA adapters: list them with their state, load and unload by hand."""

from __future__ import annotations

from aiohttp import web

from modelyard.api.access import principal_of, require_admin
from modelyard.api.admin import audit
from modelyard.api.errors import ApiError, unavailable
from modelyard.api.serving import gateway_of
from modelyard.gateway import Gateway
from modelyard.lora.manager import AdapterError, LoraManager
from modelyard.scheduler.names import Target
from modelyard.scheduler.supervisor import ModelUnavailable


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/adapters", list_adapters)
    router.add_post("/admin/adapters/rescan", rescan)
    router.add_post("/admin/adapters/{name}/load", load_adapter)
    router.add_post("/admin/adapters/{name}/unload", unload_adapter)


def _manager(request: web.Request) -> tuple[Gateway, LoraManager]:
    require_admin(request)
    gateway = gateway_of(request)
    if gateway.lora is None:
        raise ApiError(404, "no model has a 'lora:' section", "no_adapters")
    return gateway, gateway.lora


def _target(manager: LoraManager, request: web.Request) -> Target:
    name = request.match_info["name"]
    target = manager.scheduler.adapter_targets.get(name)
    if target is None:
        raise ApiError(
            404,
            f"adapter {name!r} does not exist; known: " + ", ".join(sorted(manager.adapters)),
            "adapter_not_found",
        )
    return target


async def list_adapters(request: web.Request) -> web.Response:
    _gateway, manager = _manager(request)
    return web.json_response({"adapters": manager.status()})


async def rescan(request: web.Request) -> web.Response:
    _gateway, manager = _manager(request)
    added, removed = manager.refresh()
    return web.json_response({"added": added, "removed": removed})


async def load_adapter(request: web.Request) -> web.Response:
    """Start the base engine if needed and load the adapter into it."""
    gateway, manager = _manager(request)
    target = _target(manager, request)
    audit(request, gateway, target.model, f"load adapter {target.public_name}")
    try:
        manager.check(target)
        async with (
            gateway.scheduler.engine_for(target.model) as engine,
            manager.use(target, engine),
        ):
            pass
    except AdapterError as error:
        raise ApiError(error.status, str(error), error.code) from None
    except ModelUnavailable as error:
        raise unavailable(error) from None
    return web.json_response({"adapters": manager.status()})


async def unload_adapter(request: web.Request) -> web.Response:
    gateway, manager = _manager(request)
    target = _target(manager, request)
    audit(request, gateway, target.model, f"unload adapter {target.public_name}")
    engine = gateway.scheduler.engine_of(target.model)
    unloaded = engine is not None and await manager.unload(
        target.model, target.public_name, engine, reason=f"admin ({principal_of(request).name})"
    )
    if not unloaded:
        raise ApiError(
            409,
            f"adapter {target.public_name!r} is not loaded, or requests are using it",
            "not_unloadable",
        )
    return web.json_response({"adapters": manager.status()})
