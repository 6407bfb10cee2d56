"""Health and status routes."""

from __future__ import annotations

from aiohttp import web

from modelyard import __version__
from modelyard.api.access import require_admin
from modelyard.api.serving import gateway_of
from modelyard.redaction import redact_value


async def health(request: web.Request) -> web.Response:
    """The gateway itself is up (engines are started on demand, so they are not checked)."""
    return web.json_response({"status": "ok", "version": __version__})


async def gateway_status(request: web.Request) -> web.Response:
    """GET /gateway/status (the seed 004's endpoint): models, states, GPUs."""
    gateway = gateway_of(request)
    require_admin(request)
    scheduler = gateway.scheduler
    # Failure messages and log tails come from engines: masked like every other output.
    return web.json_response(
        redact_value(
            {
                "version": __version__,
                "uptime_s": round(_now() - gateway.started_at, 3),
                "queued": scheduler.total_waiting(),
                # Waiting for a turn at a model at its max_in_flight (the fair queues).
                "waiting_turn": gateway.fair_queues.total_waiting(),
                "models": [gateway.model_status(name) for name in scheduler.models()],
                "gpus": gateway.gpu_status(),
                "nodes": gateway.node_status(),
            }
        )
    )


def _now() -> float:
    import time

    return time.time()
