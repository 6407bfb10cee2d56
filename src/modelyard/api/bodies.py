"""Reading and checking request bodies: every failure is a 400/413/415 with a clear message."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from modelyard.api.errors import ApiError
from modelyard.config.schema import LimitsConfig


def body_too_large(length: int, limit: int) -> ApiError:
    return ApiError(
        413, f"request body is {length} bytes; the limit is {limit} bytes", "body_too_large"
    )


async def read_body(request: web.Request, limits: LimitsConfig) -> bytes:
    """The request's body, read as it comes: a 413 as soon as it passes `max_body_bytes`
    (after decoding any Content-Encoding), a 408 when it has not all come within
    `body_timeout`. Called by handlers only, so after the middlewares checked Host, Origin
    and the key: nothing of a body is read, let alone parsed, for a request without one."""
    limit, timeout = limits.max_body_bytes, limits.body_timeout
    if request.content_length is not None and request.content_length > limit:
        raise body_too_large(request.content_length, limit)
    content = request.content
    try:
        if content.is_eof():
            # The whole body came with the head (the usual case): nothing to wait for.
            body = content.read_nowait()
            if len(body) > limit:
                raise _larger_than(limit)
            return body
        pieces: list[bytes] = []
        size = 0
        async with asyncio.timeout(timeout):
            while piece := await content.readany():
                size += len(piece)
                if size > limit:
                    raise _larger_than(limit)
                pieces.append(piece)
        return b"".join(pieces)
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g}s (limits.body_timeout)",
            "body_timeout",
        ) from None
    except (web.RequestPayloadError, HttpProcessingError, ValueError, EOFError) as error:
        # A Content-Encoding (gzip, deflate, br) whose data does not decode, or a body cut off.
        raise ApiError(
            400, f"request body could not be read: {type(error).__name__}", "invalid_body"
        ) from None


def _larger_than(limit: int) -> ApiError:
    return ApiError(
        413, f"request body is larger than the limit of {limit} bytes", "body_too_large"
    )


def require_json_content_type(request: web.Request) -> None:
    """JSON routes take JSON only. A browser sends `text/plain` or form bodies to any site
    without asking first ("simple" requests); `application/json` it never sends unasked."""
    content_type = request.content_type.lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        return
    raise ApiError(
        415,
        "send the body as JSON with 'Content-Type: application/json'"
        + (f" (got {content_type[:60]!r})" if "Content-Type" in request.headers else ""),
        "unsupported_media_type",
    )


def load_client_json(body: bytes) -> Any:
    """Parse a body a client sent. Every way it can fail is the client's: a 400, never a 500.
    `json` recurses once per nesting level, so `[[[[...` a few thousand deep raises
    RecursionError (not a ValueError)."""
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", "invalid_json") from None
    except ValueError as error:
        raise ApiError(400, f"request body is not valid JSON: {error}", "invalid_json") from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object", "invalid_json")
    payload = load_client_json(body)
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    if _may_repeat_model(body) and _repeats_model(body):
        # Parsers disagree on which of two keys wins: the engine might serve the other one.
        raise ApiError(
            400, "request body has more than one 'model' key", "duplicate_model", "model"
        )
    return payload


def _may_repeat_model(body: bytes) -> bool:
    """Cheap: a second `model` key needs a second `"model"`, or an escape spelling it."""
    return body.count(b'"model"') > 1 or b"\\u" in body


def _repeats_model(body: bytes) -> bool:
    top_level_repeats = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        # Called for each object, innermost first: the last call is the top level.
        nonlocal top_level_repeats
        top_level_repeats = sum(1 for key, _ in items if key == "model") > 1
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except RecursionError:  # the hook's own frames can tip a body that parsed once
        raise ApiError(400, "request body is nested too deeply", "invalid_json") from None
    return top_level_repeats


def model_field(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if model is None:
        raise ApiError(400, "you must provide a model parameter", "missing_model", "model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a non-empty string", "invalid_model", "model")
    return model


def looks_like_json_object(body: bytes) -> bool:
    return body.lstrip()[:1] == b"{"
