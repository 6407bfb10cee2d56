"""Routes for looking at the gateway: `/metrics`, `/metrics/engines` and the `/ui` dashboard."""

from __future__ import annotations

import importlib.resources
import re

from aiohttp import web

from modelyard.api.access import require_metrics
from modelyard.api.serving import gateway_of
from modelyard.observability.engine_metrics import merge_expositions, scrape_engines
from modelyard.observability.metrics import CONTENT_TYPE
from modelyard.redaction import redact

UI_FILES = importlib.resources.files("modelyard") / "ui"
_UI_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*\.(html|css|js|svg)$")
_UI_TYPES = {
    "html": "text/html",
    "css": "text/css",
    "js": "text/javascript",
    "svg": "image/svg+xml",
}
# The page handles API keys: no inline scripts, nothing from other origins, no framing
# (so the admin buttons cannot be clickjacked), no referrer leaking the URL.
UI_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/metrics", metrics)
    router.add_get("/metrics/engines", engine_metrics)
    router.add_get("/ui", ui_redirect)
    router.add_get("/ui/", ui_file)
    router.add_get("/ui/{name}", ui_file)


async def metrics(request: web.Request) -> web.Response:
    """The gateway's own metrics in Prometheus' text format."""
    require_metrics(request)
    body = gateway_of(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def engine_metrics(request: web.Request) -> web.Response:
    """Every *ready* engine's own `/metrics` (replicas included), labelled by model and
    replica; never starts an engine."""
    require_metrics(request)
    gateway = gateway_of(request)
    engines = gateway.scheduler.ready_replicas()
    ready = {key: engine.base_url for key, (_, engine) in engines.items()}
    texts = await scrape_engines(gateway.health_session, ready)
    # Engines describe their configuration in info metrics: masked like everything else.
    masked = {key: None if text is None else redact(text) for key, text in texts.items()}
    models = {key: model for key, (model, _) in engines.items()}
    body = merge_expositions(masked, models)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def ui_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


async def ui_file(request: web.Request) -> web.Response:
    """The dashboard's static files (shipped in the package; no data, so no key needed)."""
    name = request.match_info.get("name") or "index.html"
    match = _UI_NAME.match(name)
    resource = UI_FILES / name
    if match is None or not resource.is_file():
        raise web.HTTPNotFound()
    return web.Response(
        body=resource.read_bytes(),
        content_type=_UI_TYPES[match.group(1)],
        charset="utf-8",
        headers=UI_HEADERS,
    )
