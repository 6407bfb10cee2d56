"""API keys for tests: made the way `modelyard keys create` makes them."""

from __future__ import annotations

from typing import Any

from modelyard.auth.keys import generate_key, key_digest

ADMIN_KEY = generate_key()
USER_KEY = generate_key()  # may use chat only
LIMITED_KEY = generate_key()  # may use chat, 3 requests a minute


def key_config(name: str, key: str, **rights: Any) -> dict[str, Any]:
    return {"name": name, "sha256": key_digest(key), **rights}


def auth_settings() -> dict[str, Any]:
    return {
        "auth": {
            "keys": [
                key_config("ops", ADMIN_KEY, admin=True),
                key_config("alice", USER_KEY, models=["chat", "chat-*"]),
                key_config("bot", LIMITED_KEY, models=["chat"], rpm=3),
            ]
        }
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
