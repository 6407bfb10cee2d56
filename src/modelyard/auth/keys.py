"""API keys: made at random, stored only as SHA-256 digests, looked up in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from modelyard.config.schema import ApiKeyConfig

KEY_PREFIX = "my-"  # recognisable in a leaked paste, like OpenAI's "sk-"
KEY_BYTES = 32
WWW_AUTHENTICATE = 'Bearer realm="modelyard"'


def generate_key() -> str:
    """A new key: the prefix and 32 random bytes, URL-safe base64 (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def key_digest(key: str) -> str:
    """The hex SHA-256 that the config holds instead of the key."""
    return hashlib.sha256(_raw(key)).hexdigest()


def raw_digest(key: str) -> bytes:
    """The SHA-256 of `key` as bytes (what `key_digest` gives in hex)."""
    return hashlib.sha256(_raw(key)).digest()


def _raw(key: str) -> bytes:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape; this gives the bytes back.
    return key.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class ApiKey:
    """A configured key as the gateway holds it: a name, a digest and what it may do."""

    name: str
    digest: bytes
    models: tuple[str, ...]
    rpm: int | None
    admin: bool
    metrics: bool = False  # may read /metrics and /metrics/engines
    tpm: int | None = None  # tokens per minute
    token_budget: int | None = None  # tokens per budget_period
    budget_period: str = "total"  # day, month or total
    expires_at: float | None = None  # wall-clock time; runtime keys only
    revoked: bool = False  # runtime keys only: kept for the record, refused at once
    runtime: bool = False  # made through the admin API, not written in the config


class KeyRing:
    """The configured keys. `find` takes the same time whichever key (if any) matches."""

    def __init__(self, keys: Sequence[ApiKeyConfig]) -> None:
        self.keys = tuple(
            ApiKey(
                key.name,
                bytes.fromhex(key.sha256),
                tuple(key.models),
                key.rpm,
                key.admin,
                metrics=key.metrics,
                tpm=key.tpm,
                token_budget=key.token_budget,
                budget_period=key.budget_period,
            )
            for key in keys
        )
        self._by_name = {key.name: key for key in self.keys}

    def named(self, name: str) -> ApiKey | None:
        return self._by_name.get(name)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key whose digest matches `presented`, or None.

        Comparing digests (not keys) means the time taken says nothing about how much of a
        guess was right; every configured key is compared, with no early exit, so it says
        nothing about which key matched either (llama-swap compares keys with `==`).
        """
        digest = raw_digest(presented)
        found: ApiKey | None = None
        for key in self.keys:
            matches = hmac.compare_digest(digest, key.digest)
            if matches and found is None:
                found = key
        return found
