"""The auth middleware: a valid key (and room in its rate limit) or no further.

It runs before routing reaches a handler, so an unauthenticated client learns nothing (not
even which routes exist) and no model is ever started for it. The key itself is never logged,
never echoed in an error, and never forwarded to an engine (see `proxy.forward`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from modelyard.api.errors import ApiError, error_response
from modelyard.api.principal import PRINCIPAL_KEY, Principal
from modelyard.auth.keys import WWW_AUTHENTICATE, KeyRing, presented_key
from modelyard.auth.ratelimit import RateLimiter
from modelyard.auth.usage import MIGRATIONS, UsageCounters
from modelyard.config.schema import AuthConfig
from modelyard.state import StateDirectory

log = logging.getLogger("modelyard.auth")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Open without a key: liveness, the API description, and the dashboard's static files (which
# hold no data; the dashboard reads everything through routes that need an admin key).
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/openapi.yaml"})
OPEN_STATIC_PREFIX = "/ui"
REFUSAL_LOG_INTERVAL_S = 10.0


class Authenticator:
    """The key ring, the rate limiter and the usage counters, behind one middleware."""

    def __init__(self, keyring: KeyRing, limiter: RateLimiter, usage: UsageCounters) -> None:
        self.keyring = keyring
        self.limiter = limiter
        self.usage = usage
        self.refused = 0  # requests with no key or an unknown one
        self._last_refusal_log = 0.0
        self._unlogged_refusals = 0

    @classmethod
    def create(cls, config: AuthConfig, state: StateDirectory | None) -> Authenticator:
        database = state.database("key_usage", MIGRATIONS) if state is not None else None
        return cls(KeyRing(config.keys), RateLimiter(), UsageCounters(database))

    @property
    def enabled(self) -> bool:
        return bool(self.keyring)

    def middleware(self) -> Middleware:
        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if is_open(request):
                return await handler(request)
            return await self._authenticated(request, handler)

        return authenticate

    async def _authenticated(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = presented_key(request.headers)
        if key is None:
            return self._refuse(
                request,
                "missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                "missing_api_key",
            )
        api_key = self.keyring.find(key)
        if api_key is None:
            return self._refuse(request, "invalid API key", "invalid_api_key")
        wait = self.limiter.acquire(api_key.name, api_key.rpm)
        if wait > 0:
            self.usage.count_rate_limited(api_key.name)
            assert api_key.rpm is not None
            response = error_response(
                429,
                f"rate limit reached for API key {api_key.name!r}: {api_key.rpm} requests per "
                f"minute; retry in {wait:.0f}s",
                "rate_limit_exceeded",
                retry_after=wait,
            )
            response.headers["x-ratelimit-limit-requests"] = str(api_key.rpm)
            response.headers["x-ratelimit-remaining-requests"] = "0"
            response.headers["x-ratelimit-reset-requests"] = f"{wait:.3f}s"
            return response
        self.usage.count_request(api_key.name)
        request[PRINCIPAL_KEY] = Principal(
            api_key.name, api_key.admin, api_key.models, metrics=api_key.metrics
        )
        try:
            return await handler(request)
        except ApiError as error:
            if error.status == 403:
                self.usage.count_forbidden(api_key.name)
            raise

    def _refuse(self, request: web.Request, message: str, code: str) -> web.Response:
        self.refused += 1
        self._log_refusal(request, code)
        response = error_response(401, message, code)
        response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        return response

    def _log_refusal(self, request: web.Request, code: str) -> None:
        # Throttled: a scanner hammering the port must not fill the disk with log lines.
        now = time.monotonic()
        if now - self._last_refusal_log < REFUSAL_LOG_INTERVAL_S:
            self._unlogged_refusals += 1
            return
        more = f" ({self._unlogged_refusals} more since the last report)"
        log.warning(
            "refused %s %s from %s: %s%s",
            request.method,
            request.path,
            request.remote,
            code,
            more if self._unlogged_refusals else "",
        )
        self._last_refusal_log = now
        self._unlogged_refusals = 0

    def key_report(self) -> list[dict[str, Any]]:
        """Each key's name, rights and usage (never its digest), for `GET /admin/keys`."""
        return [
            {
                "name": key.name,
                "admin": key.admin,
                "metrics": key.metrics,
                "models": list(key.models),
                "rpm": key.rpm,
                "usage": self.usage.get(key.name).to_json(),
            }
            for key in self.keyring.keys
        ]


def is_open(request: web.Request) -> bool:
    path = request.path
    if path in OPEN_PATHS:
        return True
    return request.method in ("GET", "HEAD") and (
        path == OPEN_STATIC_PREFIX or path.startswith(OPEN_STATIC_PREFIX + "/")
    )
