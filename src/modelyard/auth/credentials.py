"""Headers that can carry a credential: none of them ever leaves the gateway.

Clients send keys in many places: OpenAI's SDKs `Authorization`, Anthropic-style `x-api-key`,
Azure-style `api-key` (Continue sends it beside `Authorization` on every request), Google's
`x-goog-api-key`, cookies, proxy credentials. The list is explicit (tested in
tests/security/test_credentials.py) and widened by a name rule, because a header we have not
heard of that is named like a credential is treated as one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "openai-api-key",
        "x-auth-token",
        "x-access-token",
        "cookie",
        "cookie2",
    }
)
_CREDENTIAL_WORDS = ("api-key", "apikey", "api_key", "token", "secret", "auth", "cookie", "passw")


@functools.lru_cache(maxsize=1024)  # on every forwarded header: names repeat, so look once
def is_credential_header(name: str) -> bool:
    lowered = name.lower()
    return lowered in CREDENTIAL_HEADERS or any(word in lowered for word in _CREDENTIAL_WORDS)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: `Authorization: Bearer KEY`, else `x-api-key`, else `api-key`."""
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for name in ("x-api-key", "api-key"):
        key = headers.get(name, "").strip()
        if key:
            return key
    return None
