"""Health and status routes."""

from __future__ import annotations

from aiohttp import web

from modelyard import __version__
from modelyard.api.principal import principal_of
from modelyard.api.serving import gateway_of


async def health(request: web.Request) -> web.Response:
    """The gateway itself is up (engines are started on demand, so they are not checked)."""
    return web.json_response({"status": "ok", "version": __version__})


async def gateway_status(request: web.Request) -> web.Response:
    """GET /gateway/status (the seed 004's endpoint): models, states, GPUs."""
    gateway = gateway_of(request)
    principal_of(request).require_admin()
    yard = gateway.yard
    return web.json_response(
        {
            "version": __version__,
            "uptime_s": round(_now() - gateway.started_at, 3),
            "queued": yard.total_waiting(),
            "models": [gateway.model_status(name) for name in yard.supervisors],
            "gpus": gateway.gpu_status(),
            "nodes": gateway.node_status(),
        }
    )


def _now() -> float:
    import time

    return time.time()
