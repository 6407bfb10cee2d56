"""The aiohttp application: middlewares and the route table, nothing else."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from modelyard.api import adapters, admin, keys, live, observe, openapi, reload, serving, status
from modelyard.api.errors import ApiError, error_response
from modelyard.gateway import Gateway

log = logging.getLogger("modelyard.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves in OpenAI's shape, with the right status."""
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            error.status
        )
        message = error.text if error.status != 404 else f"no route for {request.path}"
        if error.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        return error_response(error.status, message or error.reason, code)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "internal gateway error; see the gateway log", "internal_error")


def build_app(gateway: Gateway, middlewares: list[Middleware] | None = None) -> web.Application:
    # With API keys configured, nothing past `openai_errors` runs for a request without one.
    # Installed even with no keys yet: runtime keys and a reload can turn keys on.
    auth = [gateway.auth.middleware()] if gateway.auth is not None else []
    stack: list[Middleware] = [openai_errors, *auth, *(middlewares or [])]
    app = web.Application(
        middlewares=stack,
        # Bodies beyond the limit are refused by aiohttp before they are read (413).
        client_max_size=gateway.config.limits.max_body_bytes,
    )
    app[serving.GATEWAY_KEY] = gateway
    router = app.router
    router.add_get("/health", status.health)
    router.add_get("/v1/models", serving.list_models)
    router.add_get("/v1/models/{name:.+}", serving.get_model)
    router.add_post("/v1/{tail:.+}", serving.openai_model_route)
    router.add_get("/gateway/status", status.gateway_status)
    admin.add_routes(router)
    adapters.add_routes(router)  # /admin/adapters
    keys.add_routes(router)  # /admin/keys
    reload.add_routes(router)  # /admin/reload
    openapi.add_routes(router)  # /openapi.yaml, /openapi.json
    observe.add_routes(router)  # /metrics, /metrics/engines, /ui
    live.install(app)  # open SSE streams end at shutdown instead of delaying it
    router.add_route("*", "/upstream/{model}/{tail:.*}", serving.upstream_route)
    # Last: the seeds' route prefixes (`/coder/v1/...`, `/vision/generate`).
    router.add_route("*", "/{route}/{tail:.*}", serving.seed_route)
    return app
