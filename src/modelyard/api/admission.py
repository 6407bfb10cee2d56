"""Admission of a request to a model: the one set of decisions, each made once.

The middleware (`api.guards.authentication`) and the handlers (`api.serving`) call these:

- `identify`: who is asking (the key via `Authenticator.identify`: unknown, revoked and
  expired keys, token budget, tokens and requests per minute, each counted once), or the
  refusal, for any request that is not on an open route;
- `refusal_answer`: the status, headers and body of that refusal (and the throttled log line
  of a 401);
- `model_refusal`: the 404 a key gets for a model it may not use, the same as an unknown
  model's (naming only the models it may use), counted as a forbidden request.
"""

from __future__ import annotations

from collections.abc import Mapping

from modelyard.api.access import may_use, not_found
from modelyard.api.errors import ApiError, ErrorAnswer, error_answer
from modelyard.auth.authenticator import Authenticator, Refusal
from modelyard.auth.keys import WWW_AUTHENTICATE
from modelyard.auth.principal import ANONYMOUS, Principal
from modelyard.gateway import Gateway
from modelyard.scheduler.names import Target

# Open without a key: liveness, the API description, and the dashboard's static files (which
# hold no data; the dashboard reads everything through routes that need a key).
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/openapi.yaml"})
OPEN_STATIC_PREFIX = "/ui"


def is_open(method: str, path: str) -> bool:
    if path in OPEN_PATHS:
        return True
    return method in ("GET", "HEAD") and (
        path == OPEN_STATIC_PREFIX or path.startswith(OPEN_STATIC_PREFIX + "/")
    )


def needs_key(authenticator: Authenticator | None, method: str, path: str) -> bool:
    """Whether this request must present a key (keys exist, checked per request: a reload or a
    runtime key can add them; and the route is not open)."""
    return authenticator is not None and authenticator.enabled and not is_open(method, path)


def identify(
    authenticator: Authenticator | None, method: str, path: str, headers: Mapping[str, str]
) -> Principal | Refusal:
    """The principal a request acts as, or why it is refused. Counts the request for its key
    (or the refusal) and takes its place in the key's rate limit: call it once per request."""
    if authenticator is None or not needs_key(authenticator, method, path):
        return ANONYMOUS  # no keys: whoever can connect (loopback only) may do everything
    return authenticator.identify(headers, path)


def refusal_answer(
    authenticator: Authenticator, refusal: Refusal, method: str, path: str, remote: str | None
) -> ErrorAnswer:
    """A refused key's answer: 401 with `WWW-Authenticate` (and a throttled log line), or 429
    with its limit's headers (requests per minute, tokens per minute, token budget)."""
    headers: dict[str, str] = {}
    if refusal.status == 401:
        authenticator.note_refusal(method, path, remote, refusal.code)
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    elif refusal.rpm is not None and refusal.retry_after is not None:
        headers["x-ratelimit-limit-requests"] = str(refusal.rpm)
        headers["x-ratelimit-remaining-requests"] = "0"
        headers["x-ratelimit-reset-requests"] = f"{refusal.retry_after:.3f}s"
    headers.update(refusal.headers)  # tokens per minute, token budget
    return error_answer(
        refusal.status,
        refusal.message,
        refusal.code,
        retry_after=refusal.retry_after,
        extra_headers=headers,
    )


def usable_names(gateway: Gateway, principal: Principal) -> list[str]:
    """The public names this key may use (for error messages; never the others)."""
    scheduler = gateway.scheduler
    return [
        name for name in scheduler.public_names() if may_use(principal, scheduler.resolve(name))
    ]


def model_refusal(gateway: Gateway, principal: Principal, target: Target) -> ApiError | None:
    """None if the key may use `target`; else the 404 an unknown model gets. The caller counts
    it as forbidden for the key (`count_forbidden`), once per request."""
    if may_use(principal, target):
        return None
    return not_found(target.public_name, usable_names(gateway, principal))
