"""`POST /admin/reload`: read the config file again and apply it without stopping what runs."""

from __future__ import annotations

from aiohttp import web

from modelyard.api.access import require_admin
from modelyard.api.admin import audit
from modelyard.api.errors import ApiError
from modelyard.api.serving import gateway_of
from modelyard.config.loader import ConfigError


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/reload", reload_config)


async def reload_config(request: web.Request) -> web.Response:
    require_admin(request)
    gateway = gateway_of(request)
    audit(request, gateway, None, "reload")
    try:
        report = await gateway.reload()
    except ConfigError as error:
        # Nothing was changed: the message names the file, the key and the problem.
        raise ApiError(
            400,
            "the configuration was not reloaded (the running one is unchanged):\n" + str(error),
            "invalid_config",
        ) from None
    return web.json_response(report.to_json())
