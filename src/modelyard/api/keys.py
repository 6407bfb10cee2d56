"""`GET /admin/keys`: each API key's name, rights and usage; never a key or its digest."""

from __future__ import annotations

from aiohttp import web

from modelyard.api.access import require_admin
from modelyard.api.serving import gateway_of


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/keys", key_usage)


async def key_usage(request: web.Request) -> web.Response:
    require_admin(request)
    auth = gateway_of(request).auth
    keys = auth.key_report() if auth is not None else []
    refused = auth.refused if auth is not None else 0
    return web.json_response({"keys": keys, "refused": refused})
