"""Reading and checking request bodies: every failure is a 400/413 with a clear message."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from modelyard.api.errors import ApiError


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(
            413,
            f"request body is {request.content_length} bytes; the limit is {limit} bytes",
            "body_too_large",
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413, f"request body is larger than the limit of {limit} bytes", "body_too_large"
        ) from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object", "invalid_json")
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", "invalid_json") from None
    except ValueError as error:
        raise ApiError(400, f"request body is not valid JSON: {error}", "invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    return payload


def model_field(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if model is None:
        raise ApiError(400, "you must provide a model parameter", "missing_model", "model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a non-empty string", "invalid_model", "model")
    return model
