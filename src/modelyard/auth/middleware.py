"""The auth middleware: a valid key (and room in its rate limit) or no further.

It runs before routing reaches a handler, so an unauthenticated client learns nothing (not
even which routes exist) and no model is ever started for it. The key itself is never logged,
never echoed in an error, and never forwarded to an engine (see `proxy.forward`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from modelyard.api.errors import ApiError, error_response
from modelyard.api.principal import PRINCIPAL_KEY, Principal
from modelyard.auth.budgets import MIGRATIONS as BUDGET_MIGRATIONS
from modelyard.auth.budgets import TokenLedger
from modelyard.auth.keys import WWW_AUTHENTICATE, ApiKey, KeyRing, presented_key
from modelyard.auth.ratelimit import RateLimiter
from modelyard.auth.runtime_keys import MIGRATIONS as RUNTIME_MIGRATIONS
from modelyard.auth.runtime_keys import RuntimeKeyStore
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
# The key name that requests on an open route (no key) are counted under.
OPEN_ROUTE_KEY_NAME = "open-route"


class Authenticator:
    """The key ring, the rate limiter and the usage counters, behind one middleware."""

    def __init__(
        self,
        keyring: KeyRing,
        limiter: RateLimiter,
        usage: UsageCounters,
        runtime_keys: RuntimeKeyStore | None = None,
        ledger: TokenLedger | None = None,
    ) -> None:
        self.keyring = keyring
        self.limiter = limiter
        self.usage = usage
        # `is None`, not `or`: an empty key store is falsy.
        self.runtime_keys = RuntimeKeyStore(None) if runtime_keys is None else runtime_keys
        self.ledger = TokenLedger(None) if ledger is None else ledger
        self.refused = 0  # requests with no key or an unknown one
        self._last_refusal_log = 0.0
        self._unlogged_refusals = 0
        # Routes served without a key (`open_route: true`), route -> model; set by the gateway
        # and replaced on a config reload.
        self.open_routes: Mapping[str, str] = {}

    @classmethod
    def create(cls, config: AuthConfig, state: StateDirectory | None) -> Authenticator:
        usage = state.database("key_usage", MIGRATIONS) if state is not None else None
        stored = state.database("runtime_keys", RUNTIME_MIGRATIONS) if state is not None else None
        tokens = state.database("key_tokens", BUDGET_MIGRATIONS) if state is not None else None
        return cls(
            KeyRing(config.keys),
            RateLimiter(),
            UsageCounters(usage),
            RuntimeKeyStore(stored),
            TokenLedger(tokens),
        )

    def replace_config_keys(self, config: AuthConfig) -> None:
        """A reloaded config's keys; usage and runtime keys are kept (by name)."""
        self.keyring = KeyRing(config.keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keyring) or bool(self.runtime_keys)

    def middleware(self) -> Middleware:
        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            # Checked per request: keys may appear or go with a reload or a runtime key.
            if not self.enabled or is_open(request):
                return await handler(request)
            return await self._authenticated(request, handler)

        return authenticate

    def _open_route_principal(self, request: web.Request) -> Principal | None:
        """Without a key, a route the config leaves open serves its own model (only)."""
        route = request.path.split("/", 2)[1] if request.path.count("/") >= 1 else ""
        model = self.open_routes.get(route)
        if model is None:
            return None
        return Principal(OPEN_ROUTE_KEY_NAME, admin=False, model_patterns=(_literal(model),))

    async def _authenticated(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = presented_key(request.headers)
        if key is None:
            open_principal = self._open_route_principal(request)
            if open_principal is not None:
                request[PRINCIPAL_KEY] = open_principal
                return await handler(request)
            return self._refuse(
                request,
                "missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                "missing_api_key",
            )
        api_key = self.keyring.find(key) or self.runtime_keys.find(key)
        if api_key is None:
            return self._refuse(request, "invalid API key", "invalid_api_key")
        if api_key.revoked:
            return self._refuse(request, f"API key {api_key.name!r} was revoked", "key_revoked")
        if self.runtime_keys.expired(api_key):
            return self._refuse(request, f"API key {api_key.name!r} has expired", "key_expired")
        refusal = self.ledger.refusal(api_key)
        if refusal is not None:
            self.usage.count_rate_limited(api_key.name)
            response = error_response(
                429, refusal.message, refusal.code, retry_after=refusal.retry_after
            )
            response.headers.update(refusal.headers)
            return response
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
        request[PRINCIPAL_KEY] = Principal(api_key.name, api_key.admin, api_key.models)
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
        return [self.describe(key) for key in (*self.keyring.keys, *self.runtime_keys.keys())]

    def describe(self, key: ApiKey) -> dict[str, Any]:
        """One key as the admin API shows it: rights, limits, budget and usage per model."""
        return {
            "name": key.name,
            "source": "runtime" if key.runtime else "config",
            "admin": key.admin,
            "models": list(key.models),
            "rpm": key.rpm,
            "tpm": key.tpm,
            "budget": self.ledger.budget_report(key),
            "expires_at": key.expires_at,
            "expired": self.runtime_keys.expired(key),
            "revoked": key.revoked,
            "created_at": self.runtime_keys.created_at.get(key.name) if key.runtime else None,
            "usage": {
                **self.usage.get(key.name).to_json(),
                "models": self.ledger.usage(key.name),
            },
        }

    async def close(self) -> None:
        await self.usage.close()
        await self.ledger.close()
        self.runtime_keys.close()


def _literal(name: str) -> str:
    """A glob pattern that matches `name` only (model names may hold '[' and '*')."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def is_open(request: web.Request) -> bool:
    path = request.path
    if path in OPEN_PATHS:
        return True
    return request.method in ("GET", "HEAD") and (
        path == OPEN_STATIC_PREFIX or path.startswith(OPEN_STATIC_PREFIX + "/")
    )
