"""Access checks in the web layer: the request's principal and the errors it earns.

Scoped keys must not learn which models exist: a model the key may not use and a model that
does not exist get the same 404, naming only the models the key may use.
"""

from __future__ import annotations

from aiohttp import web

from modelyard.api.errors import ApiError
from modelyard.auth.engine_paths import is_engine_control, remote_path_allowed
from modelyard.auth.principal import NOBODY, Principal
from modelyard.scheduler.names import Target

PRINCIPAL_KEY = web.RequestKey("modelyard.principal", Principal)
FORBIDDEN_KEY = web.RequestKey("modelyard.forbidden", bool)  # access refused: counted per key


def principal_of(request: web.Request) -> Principal:
    """Who the request acts as; a request no key check passed (an open route) may use
    nothing. The authentication middleware sets the anonymous admin only where keys are off."""
    principal = request.get(PRINCIPAL_KEY)
    return principal if isinstance(principal, Principal) else NOBODY


def may_use(principal: Principal, target: Target) -> bool:
    return principal.may_use(target.public_name, target.model)


def not_found(name: str, usable: list[str]) -> ApiError:
    known = ", ".join(usable) or "(none)"
    return ApiError(
        404, f"model {name!r} does not exist; known models: {known}", "model_not_found", "model"
    )


def require_admin(request: web.Request) -> None:
    principal = principal_of(request)
    if not principal.admin:
        request[FORBIDDEN_KEY] = True
        raise ApiError(
            403, f"this API key ({principal.name}) is not an admin key", "admin_required"
        )


def require_metrics(request: web.Request) -> None:
    """`/metrics` and `/metrics/engines`: an admin key or a read-only metrics key."""
    principal = principal_of(request)
    if not (principal.admin or principal.metrics):
        request[FORBIDDEN_KEY] = True
        raise ApiError(
            403,
            f"this API key ({principal.name}) may not read metrics: use an admin key or one "
            "with 'metrics: true'",
            "admin_required",  # the code these routes always gave; the message says more
        )


def require_engine_path(request: web.Request, path: str) -> None:
    """Engine control endpoints (`/sleep`, `/v1/load_lora_adapter`, ...) need an admin."""
    principal = principal_of(request)
    if not principal.admin and is_engine_control(path):
        request[FORBIDDEN_KEY] = True
        raise ApiError(
            403,
            f"this path controls the engine itself; this API key ({principal.name}) is not an "
            "admin key",
            "admin_required",
        )


def require_remote_path(path: str, extra: list[str]) -> None:
    """A remote engine is reached on OpenAI's routes and its `upstream_paths:` only, whoever
    asks: the gateway's own key for it must not open the rest of that server."""
    if not remote_path_allowed(path, extra):
        raise ApiError(
            403,
            "this path is not open on this remote engine (OpenAI routes only; the config's "
            "'upstream_paths:' opens more)",
            "path_not_allowed",
        )
