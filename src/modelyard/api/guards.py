"""The middlewares every request passes before a handler, outermost first:

1. `browser_guard`: Host and Origin rules and CORS preflights (`auth.origins`);
2. `canonical_form`: the one reading of the request target (`proxy.canonical`), or a 400;
3. `authentication`: a valid key or a 401/429 (`auth.authenticator`); nothing past it runs
   for a request without one, so an unauthenticated client cannot even learn which routes
   exist.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from modelyard.api.access import FORBIDDEN_KEY, PRINCIPAL_KEY
from modelyard.api.admission import identify, is_open, needs_key, refusal_answer
from modelyard.api.cors import CORS_ORIGIN_KEY, add_cors_headers
from modelyard.api.errors import ApiError
from modelyard.api.worker_desk import raw_target
from modelyard.auth.authenticator import Authenticator, Refusal
from modelyard.auth.origins import BrowserPolicy
from modelyard.auth.principal import ANONYMOUS
from modelyard.proxy.canonical import CanonicalTarget, NonCanonical, canonical_target

__all__ = ["CORS_ORIGIN_KEY", "add_cors_headers"]  # kept here for their importers too

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CANONICAL_KEY = web.RequestKey("modelyard.canonical", CanonicalTarget)
CORS_ALLOWED_HEADERS = (
    "Authorization, Content-Type, X-Api-Key, Api-Key, OpenAI-Organization, OpenAI-Project, "
    "X-Stainless-Arch, X-Stainless-Lang, X-Stainless-OS, X-Stainless-Package-Version, "
    "X-Stainless-Retry-Count, X-Stainless-Runtime, X-Stainless-Runtime-Version, "
    "X-Stainless-Timeout, X-Stainless-Async, Last-Event-ID, Cache-Control"
)


def canonical_of(request: web.Request) -> CanonicalTarget:
    """The canonical target (set by `canonical_form`; computed here for apps without it)."""
    found = request.get(CANONICAL_KEY)
    return found if found is not None else canonical_target(raw_target(request))


def browser_guard(policy: BrowserPolicy) -> Middleware:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        problem = policy.host_problem(headers.get("Host"))
        if problem is not None:
            raise ApiError(421, problem, "host_not_allowed")
        origin = headers.get("Origin")
        if request.method == "OPTIONS" and origin is not None:
            return _preflight(policy, origin, headers)
        problem = policy.origin_problem(
            headers, request.method, is_open(request.method, request.path)
        )
        if problem is not None:
            raise ApiError(403, problem, "cross_origin_forbidden")
        if origin is not None and policy.is_listed(origin):
            request[CORS_ORIGIN_KEY] = origin
        return await handler(request)

    return guard


def _preflight(policy: BrowserPolicy, origin: str, headers: object) -> web.StreamResponse:
    if not policy.is_listed(origin):
        raise ApiError(
            403,
            f"requests from the web page at {origin[:100]!r} are not allowed; list its origin "
            "under cors: allowed_origins: to allow it",
            "cross_origin_forbidden",
        )
    # The origin itself, never '*', and no Allow-Credentials: the gateway uses no cookies,
    # and a key travels in a header that the page's own code must set.
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": CORS_ALLOWED_HEADERS,
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        },
    )


@web.middleware
async def canonical_form(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        target = canonical_target(raw_target(request))
    except NonCanonical as error:
        raise ApiError(400, f"invalid request path: {error}", "invalid_path") from None
    # The router matched the server's own decoding; a disagreement with ours is refused
    # rather than guessed at.
    if target.path != request.path:
        raise ApiError(400, "invalid request path: ambiguous encoding", "invalid_path")
    request[CANONICAL_KEY] = target
    return await handler(request)


@web.middleware
async def keyless(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A gateway built with no authenticator (no keys, loopback only): the anonymous admin,
    set explicitly, since a request with no principal may use nothing."""
    request[PRINCIPAL_KEY] = ANONYMOUS
    return await handler(request)


def authentication(authenticator: Authenticator) -> Middleware:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Who is asking and whether they may, decided once (`api.admission`).
        if not needs_key(authenticator, request.method, request.path):
            if not authenticator.enabled:
                # No keys at all (loopback only): whoever can connect may do everything.
                request[PRINCIPAL_KEY] = ANONYMOUS
            return await handler(request)
        identity = identify(authenticator, request.method, request.path, request.headers)
        if isinstance(identity, Refusal):
            answer = refusal_answer(
                authenticator, identity, request.method, request.path, request.remote
            )
            return web.Response(
                status=answer.status,
                text=answer.body.decode(),
                content_type="application/json",
                headers=answer.headers,
            )
        request[PRINCIPAL_KEY] = identity
        try:
            return await handler(request)
        finally:
            if request.get(FORBIDDEN_KEY):
                authenticator.usage.count_forbidden(identity.name)

    return authenticate
