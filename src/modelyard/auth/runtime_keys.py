"""API keys made while the gateway runs (LiteLLM's "virtual keys"): created, changed and revoked
through the admin API, kept hashed in `<state_dir>/runtime_keys.sqlite3` beside the config's keys.

Only the SHA-256 of a key is stored, as for the config's keys. A revoked key keeps its row (its
name and usage stay on record) and is refused from the next request on: the store is the one
the middleware reads, so there is nothing to propagate.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from modelyard.auth.keys import ApiKey, generate_key, key_digest, raw_digest
from modelyard.auth.principal import DEFAULT_SHARE, ShareTerms
from modelyard.state import StateDatabase

MIGRATIONS = [
    """
    CREATE TABLE runtime_keys (
        name TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE,
        models TEXT NOT NULL,
        rpm INTEGER,
        tpm INTEGER,
        token_budget INTEGER,
        budget_period TEXT NOT NULL DEFAULT 'total',
        expires_at REAL,
        admin INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        revoked_at REAL
    )
    """,
    # How the key shares busy engines: {"weight", "priority", "max_in_flight", "keep_alive"}.
    "ALTER TABLE runtime_keys ADD COLUMN sharing TEXT",
]

# Usage without a key is counted under these names; a key may not take them.
RESERVED_KEY_NAMES = frozenset({"anonymous", "open-route"})
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class KeyFields(BaseModel):
    """What a runtime key may do; the body of `PATCH /admin/keys/{name}` (all optional).

    `null` (or 0 for the numbers) removes a limit."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] | None = Field(default=None, description="glob patterns over model names")
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    token_budget: int | None = Field(default=None, ge=0)
    budget_period: Literal["day", "month", "total"] | None = None
    expires_at: float | None = Field(default=None, ge=0, description="Unix time")
    expires_in: float | None = Field(default=None, gt=0, description="seconds from now")
    admin: bool | None = None
    weight: float | None = Field(default=None, gt=0, le=1000)
    priority: int | None = Field(default=None, ge=-1000, le=1000)
    max_in_flight: int | None = Field(default=None, ge=0, description="0 or null: no limit")
    keep_alive: bool | None = None

    @field_validator("models")
    @classmethod
    def _patterns(cls, models: list[str] | None) -> list[str] | None:
        if models is not None and (not models or any(not m or len(m) > 200 for m in models)):
            raise ValueError("models must be a non-empty list of glob patterns")
        return models


class NewKey(KeyFields):
    """The body of `POST /admin/keys`."""

    name: str

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        # The name is what logs, events and metric labels show for this key.
        if not _KEY_NAME.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a valid key name (letters, digits and . _ @ -, up to 64)"
            )
        if name in RESERVED_KEY_NAMES:
            raise ValueError(f"{name!r} is the name usage without a key is counted under")
        return name


class KeyConflict(Exception):
    """The name is taken (by a config key or another runtime key): a 409."""


class UnknownKey(Exception):
    """No runtime key by that name: a 404."""


class RuntimeKeyStore:
    """Runtime keys in memory for the request path, written through to SQLite on every change
    (changes are rare; a lost revocation would not be)."""

    def __init__(
        self, database: StateDatabase | None, clock: Callable[[], float] = time.time
    ) -> None:
        self._database = database
        self._clock = clock
        self._by_name: dict[str, ApiKey] = {}
        self._by_digest: dict[bytes, ApiKey] = {}
        self.created_at: dict[str, float] = {}
        # One change at a time: two edits of one key must be saved in the order they are kept.
        self._changing = asyncio.Lock()
        if database is not None:
            for row in database.query("SELECT * FROM runtime_keys ORDER BY created_at"):
                self._remember(_from_row(row), row["created_at"])

    def __bool__(self) -> bool:
        """Whether any key can still be used (then the gateway must ask for keys)."""
        return bool(self._by_name) and any(not key.revoked for key in self._by_name.values())

    def keys(self) -> list[ApiKey]:
        return list(self._by_name.values())

    def get(self, name: str) -> ApiKey | None:
        return self._by_name.get(name)

    def find(self, presented: str) -> ApiKey | None:
        """The runtime key `presented` is, or None (revoked and expired keys included: the
        caller says why they are refused).

        A dict lookup by digest, not a scan: there may be thousands of runtime keys, and the
        time a lookup takes depends only on the SHA-256 of the guess, which says nothing about
        any stored key (finding a key from its digest is a preimage attack).
        """
        return self._by_digest.get(raw_digest(presented))

    def expired(self, key: ApiKey) -> bool:
        return key.expires_at is not None and self._clock() >= key.expires_at

    async def create(self, request: NewKey, taken: Iterable[str]) -> tuple[str, ApiKey]:
        """Make a key; returns the key itself (shown once) and its record."""
        async with self._changing:
            return await self._create(request, set(taken))

    async def change(self, name: str, fields: KeyFields) -> ApiKey:
        async with self._changing:
            key = self._existing(name)
            if key.revoked:
                raise KeyConflict(f"API key {name!r} was revoked; create a new one")
            changed = self._changed(key, fields)
            await self._save(changed, self.created_at[name])
            self._remember(changed, self.created_at[name])
            return changed

    async def revoke(self, name: str) -> ApiKey:
        async with self._changing:
            key = self._existing(name)
            revoked = replace(key, revoked=True)
            await self._save(revoked, self.created_at[name], revoked_at=self._clock())
            self._remember(revoked, self.created_at[name])
            return revoked

    def close(self) -> None:
        if self._database is not None:
            self._database.close()

    async def _create(self, request: NewKey, taken: set[str]) -> tuple[str, ApiKey]:
        if request.name in self._by_name or request.name in taken:
            raise KeyConflict(f"an API key named {request.name!r} already exists")
        secret = generate_key()
        base = ApiKey(
            name=request.name,
            digest=bytes.fromhex(key_digest(secret)),
            models=("*",),
            rpm=None,
            admin=False,
            runtime=True,
        )
        key = self._changed(base, request)
        now = self._clock()
        await self._save(key, now)
        self._remember(key, now)
        return secret, key

    def _existing(self, name: str) -> ApiKey:
        key = self._by_name.get(name)
        if key is None:
            raise UnknownKey(f"no runtime API key named {name!r}")
        return key

    def _changed(self, key: ApiKey, fields: KeyFields) -> ApiKey:
        given = fields.model_fields_set
        updates: dict[str, Any] = {}
        if "models" in given and fields.models is not None:
            updates["models"] = tuple(fields.models)
        for limit in ("rpm", "tpm", "token_budget"):
            if limit in given:
                updates[limit] = getattr(fields, limit) or None  # 0 or null: no limit
        if "budget_period" in given and fields.budget_period is not None:
            updates["budget_period"] = fields.budget_period
        if "expires_at" in given:
            updates["expires_at"] = fields.expires_at
        if "expires_in" in given and fields.expires_in is not None:
            updates["expires_at"] = self._clock() + fields.expires_in
        if "admin" in given and fields.admin is not None:
            updates["admin"] = fields.admin
        share = key.share
        if "weight" in given:
            share = replace(share, weight=fields.weight or 1.0)
        if "priority" in given:
            share = replace(share, priority=fields.priority or 0)
        if "max_in_flight" in given:
            share = replace(share, max_in_flight=fields.max_in_flight or None)
        if "keep_alive" in given:
            share = replace(share, keep_alive=fields.keep_alive is not False)
        return replace(key, **updates, share=share)

    def _remember(self, key: ApiKey, created_at: float) -> None:
        old = self._by_name.get(key.name)
        if old is not None:
            self._by_digest.pop(old.digest, None)
        self._by_name[key.name] = key
        self._by_digest[key.digest] = key
        self.created_at[key.name] = created_at

    async def _save(self, key: ApiKey, created_at: float, revoked_at: float | None = None) -> None:
        """Write `key` through, in a worker thread: SQLite may wait seconds for a lock another
        process holds. The caller remembers the key only once it is saved, so the admin API
        never answers for a change that a restart would undo."""
        if self._database is None:
            return
        row = (
            key.name,
            key.digest.hex(),
            json.dumps(list(key.models)),
            key.rpm,
            key.tpm,
            key.token_budget,
            key.budget_period,
            key.expires_at,
            int(key.admin),
            created_at,
            revoked_at,
            json.dumps(asdict(key.share)),
        )
        database = self._database
        await asyncio.to_thread(
            database.write,
            lambda connection: connection.execute(
                "INSERT INTO runtime_keys (name, sha256, models, rpm, tpm, token_budget, "
                "budget_period, expires_at, admin, created_at, revoked_at, sharing) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "models = excluded.models, rpm = excluded.rpm, tpm = excluded.tpm, "
                "token_budget = excluded.token_budget, budget_period = excluded.budget_period, "
                "expires_at = excluded.expires_at, admin = excluded.admin, "
                "sharing = excluded.sharing, "
                "revoked_at = COALESCE(excluded.revoked_at, runtime_keys.revoked_at)",
                row,
            ),
        )


def _from_row(row: Any) -> ApiKey:
    return ApiKey(
        name=row["name"],
        digest=bytes.fromhex(row["sha256"]),
        models=tuple(json.loads(row["models"])),
        rpm=row["rpm"],
        admin=bool(row["admin"]),
        tpm=row["tpm"],
        token_budget=row["token_budget"],
        budget_period=row["budget_period"],
        expires_at=row["expires_at"],
        revoked=row["revoked_at"] is not None,
        runtime=True,
        share=ShareTerms(**json.loads(row["sharing"])) if row["sharing"] else DEFAULT_SHARE,
    )
