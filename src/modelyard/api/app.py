"""The aiohttp application: middlewares and the route table, nothing else."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from modelyard.api import adapters, admin, keys, live, observe, openapi, reload, serving, status
from modelyard.api.errors import ApiError, error_response
from modelyard.api.guards import (
    add_cors_headers,
    authentication,
    browser_guard,
    canonical_form,
    keyless,
)
from modelyard.api.worker_desk import AdmissionDesk
from modelyard.auth.origins import BrowserPolicy
from modelyard.gateway import Gateway
from modelyard.observability.log_guard import CLIENT_CAUSED_ATTR

log = logging.getLogger("modelyard.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The Host and Origin rules in force.
POLICY_KEY = web.AppKey("browser_policy", BrowserPolicy)


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
        # Never a list of routes, and never the path echoed (it is the client's own input).
        message = error.text if error.status not in (404, 405) else "no such route"
        if error.status == 405:
            message = f"method {request.method} is not allowed on this route"
        return error_response(error.status, message or error.reason, code)
    except Exception:
        # A client that can trigger a bug at will must not fill the log with tracebacks.
        log.exception(
            "internal error on %s %s",
            request.method,
            request.path,
            extra={CLIENT_CAUSED_ATTR: True},
        )
        return error_response(500, "internal gateway error; see the gateway log", "internal_error")


def build_app(
    gateway: Gateway,
    middlewares: list[Middleware] | None = None,
    desk: AdmissionDesk | None = None,
) -> web.Application:
    # With API keys configured, nothing past `authentication` runs for a request without one.
    # Installed even with no keys yet: runtime keys and a reload can turn keys on.
    keyed = gateway.auth is not None and gateway.auth.enabled
    auth = [authentication(gateway.auth)] if gateway.auth is not None else [keyless]
    policy = BrowserPolicy(gateway.config, keyless=not keyed)
    # A reload may change the browser rules (cors, allowed_hosts) and whether keys exist.
    gateway.reload_hooks.append(
        lambda config: policy.reconfigure(
            config, keyless=gateway.auth is None or not gateway.auth.enabled
        )
    )
    # With proxy workers, their requests (on the owner's Unix socket) go through the same
    # stack; `desk` puts what must go back to a worker on its channel (api.worker_desk).
    stack: list[Middleware] = [
        *([desk.middleware()] if desk is not None else []),
        openai_errors,
        browser_guard(policy),
        canonical_form,
        *auth,
        *(middlewares or []),
    ]
    # Bodies are read by `api.bodies.read_body` alone, which enforces limits.max_body_bytes
    # (as reloaded) while reading; aiohttp's own `client_max_size` is never reached.
    app = web.Application(middlewares=stack)
    app[serving.GATEWAY_KEY] = gateway
    app[POLICY_KEY] = policy
    app.on_response_prepare.append(add_cors_headers)
    router = app.router
    router.add_get("/health", status.health)
    router.add_get("/v1/models", serving.list_models)
    router.add_get("/v1/models/{name:.+}", serving.get_model)
    router.add_post("/v1/{tail:.+}", serving.openai_model_route)
    for path in ("/tokenize", "/detokenize", "/rerank", "/v2/rerank", "/score", "/pooling"):
        router.add_post(path, serving.openai_model_route)  # vLLM's routes outside /v1
    router.add_post("/classify", serving.openai_model_route)
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
