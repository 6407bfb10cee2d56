"""Deciding who a request comes from: a valid key (and room in its rate limit) or a refusal.

Pure of the web framework: the web layer (`api.authentication`) asks `identify` with the
request's headers and turns a `Refusal` into a response. The key itself is never logged,
never echoed in an error, and never forwarded to an engine (see `auth.credentials`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelyard.auth.budgets import MIGRATIONS as BUDGET_MIGRATIONS
from modelyard.auth.budgets import Reservation, TokenLedger
from modelyard.auth.credentials import presented_key
from modelyard.auth.keys import ApiKey, KeyRing
from modelyard.auth.principal import Principal
from modelyard.auth.ratelimit import RateLimiter
from modelyard.auth.runtime_keys import MIGRATIONS as RUNTIME_MIGRATIONS
from modelyard.auth.runtime_keys import RuntimeKeyStore
from modelyard.auth.usage import MIGRATIONS, UsageCounters
from modelyard.config.loader import ConfigError
from modelyard.config.schema import AuthConfig
from modelyard.redaction import one_line
from modelyard.state import StateDirectory

log = logging.getLogger("modelyard.auth")
REFUSAL_LOG_INTERVAL_S = 10.0
# The key name that requests on an open route (no key) are counted under.
OPEN_ROUTE_KEY_NAME = "open-route"


@dataclass(frozen=True)
class Refusal:
    """Why a request gets no further: 401 (no, unknown, revoked or expired key) or 429 (rate
    limit, tokens per minute, token budget)."""

    status: int
    message: str
    code: str
    retry_after: float | None = None
    rpm: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. x-ratelimit-*-tokens


class Authenticator:
    """The config's key ring, runtime keys, the rate limiter, usage counters and tokens."""

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

    def require_unique_names(self, config: AuthConfig, source: str) -> None:
        """Key names are unique across config and run time: a config key named like a
        runtime key would leave that runtime key impossible to change or revoke (409) while
        it still works (issue 23). Raises `ConfigError` naming them."""
        taken = sorted(key.name for key in config.keys if self.runtime_keys.get(key.name))
        if taken:
            raise ConfigError(
                [
                    f"{source}: auth.keys: {', '.join(map(repr, taken))}: a runtime key "
                    "already has this name (runtime keys stay on record, revoked ones too: "
                    "give the config key another name)"
                ]
            )

    def replace_config_keys(self, config: AuthConfig) -> None:
        """A reloaded config's keys; usage and runtime keys are kept (by name)."""
        self.keyring = KeyRing(config.keys)

    @property
    def enabled(self) -> bool:
        # Checked per request: keys may appear or go with a reload or a runtime key.
        return bool(self.keyring) or bool(self.runtime_keys)

    def _open_route_principal(self, path: str) -> Principal | None:
        """Without a key, a route the config leaves open serves its own model (only)."""
        parts = path.split("/", 2)
        model = self.open_routes.get(parts[1]) if len(parts) > 1 else None
        if model is None:
            return None
        return Principal(OPEN_ROUTE_KEY_NAME, admin=False, model_patterns=(_literal(model),))

    def identify(self, headers: Mapping[str, str], path: str = "") -> Principal | Refusal:
        key = presented_key(headers)
        if key is None:
            open_principal = self._open_route_principal(path)
            if open_principal is not None:
                return open_principal
            return Refusal(
                401,
                "missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                "missing_api_key",
            )
        api_key = self.keyring.find(key) or self.runtime_keys.find(key)
        if api_key is None:
            return Refusal(401, "invalid API key", "invalid_api_key")
        if api_key.revoked:
            return Refusal(401, f"API key {api_key.name!r} was revoked", "key_revoked")
        if self.runtime_keys.expired(api_key):
            return Refusal(401, f"API key {api_key.name!r} has expired", "key_expired")
        spent = self.ledger.refusal(api_key)
        if spent is not None:
            self.usage.count_rate_limited(api_key.name)
            return Refusal(
                429, spent.message, spent.code, retry_after=spent.retry_after, headers=spent.headers
            )
        wait = self.limiter.acquire(api_key.name, api_key.rpm)
        if wait > 0:
            self.usage.count_rate_limited(api_key.name)
            return Refusal(
                429,
                f"rate limit reached for API key {api_key.name!r}: {api_key.rpm} requests per "
                f"minute; retry in {wait:.0f}s",
                "rate_limit_exceeded",
                retry_after=wait,
                rpm=api_key.rpm,
            )
        self.usage.count_request(api_key.name)
        return Principal(api_key.name, api_key.admin, api_key.models, metrics=api_key.metrics)

    def reserve(self, name: str, tokens: int) -> Reservation | Refusal:
        """Hold `tokens` for a request of key `name` that is about to reach an engine (its
        budget and tokens per minute; see `auth.budgets`), or the 429 that refuses it."""
        key = self.keyring.named(name) or self.runtime_keys.get(name)
        if key is None:
            return Reservation(name, 0)  # the anonymous admin, an open route: no limits
        held = self.ledger.reserve(key, tokens)
        if isinstance(held, Reservation):
            return held
        self.usage.count_rate_limited(name)
        return Refusal(
            429, held.message, held.code, retry_after=held.retry_after, headers=held.headers
        )

    def note_refusal(self, method: str, path: str, remote: str | None, code: str) -> None:
        """Log a refused request, throttled: a scanner must not fill the disk with lines."""
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log < REFUSAL_LOG_INTERVAL_S:
            self._unlogged_refusals += 1
            return
        more = f" ({self._unlogged_refusals} more since the last report)"
        log.warning(
            "refused %s %s from %s: %s%s",
            one_line(method, 20),
            one_line(path),
            remote,
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
            "metrics": key.metrics,
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
