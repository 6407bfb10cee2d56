"""Deciding who a request comes from: a valid key (and room in its rate limit) or a refusal.

Pure of the web framework: the web layer (`api.authentication`) asks `identify` with the
request's headers and turns a `Refusal` into a response. The key itself is never logged,
never echoed in an error, and never forwarded to an engine (see `auth.credentials`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelyard.auth.credentials import presented_key
from modelyard.auth.keys import KeyRing
from modelyard.auth.principal import Principal
from modelyard.auth.ratelimit import RateLimiter
from modelyard.auth.usage import MIGRATIONS, UsageCounters
from modelyard.config.schema import AuthConfig
from modelyard.redaction import one_line
from modelyard.state import StateDirectory

log = logging.getLogger("modelyard.auth")
REFUSAL_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class Refusal:
    """Why a request gets no further: 401 (no or unknown key) or 429 (rate limit)."""

    status: int
    message: str
    code: str
    retry_after: float | None = None
    rpm: int | None = None


class Authenticator:
    """The key ring, the rate limiter and the usage counters."""

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

    def identify(self, headers: Mapping[str, str]) -> Principal | Refusal:
        key = presented_key(headers)
        if key is None:
            return Refusal(
                401,
                "missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                "missing_api_key",
            )
        api_key = self.keyring.find(key)
        if api_key is None:
            return Refusal(401, "invalid API key", "invalid_api_key")
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
