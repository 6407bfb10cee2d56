"""What an answer to a listed browser origin says (the origin is checked by
`api.guards.browser_guard`); light to import, for the proxy workers too."""

from __future__ import annotations

from aiohttp import web

CORS_ORIGIN_KEY = web.RequestKey("modelyard.cors_origin", str)
CORS_EXPOSED_HEADERS = (
    "Retry-After, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
    "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, "
    "x-ratelimit-reset-tokens, x-budget-limit-tokens, x-budget-spent-tokens"
)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: answers to a listed origin say so (streams too)."""
    origin = request.get(CORS_ORIGIN_KEY)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED_HEADERS
        response.headers["Vary"] = "Origin"
