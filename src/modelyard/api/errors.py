"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from modelyard.redaction import redact, without_addresses

if TYPE_CHECKING:  # kept out of light importers (proxy workers)
    from modelyard.scheduler.supervisor import ModelUnavailable

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, dict[str, str | None]]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    # The last line of defence: no error body shows a secret (modelyard.redaction).
    message = redact(message)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ErrorAnswer:
    """An error as the gateway writes it: the status, headers besides Content-Type and
    Content-Length, and the JSON body."""

    status: int
    headers: dict[str, str]
    body: bytes


def error_answer(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> ErrorAnswer:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    headers.update(extra_headers or {})
    body = json.dumps(error_body(status, message, code, param)).encode()
    return ErrorAnswer(status, headers, body)


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> web.Response:
    answer = error_answer(status, message, code, param, retry_after, extra_headers)
    return web.Response(
        status=answer.status,
        text=answer.body.decode(),
        content_type="application/json",
        headers=answer.headers,
    )


class ApiError(Exception):
    """Raised by handlers and helpers; the error middleware renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.headers = dict(headers or {})  # e.g. a token budget's x-budget-* headers

    def answer(self, extra_headers: Mapping[str, str] | None = None) -> ErrorAnswer:
        return error_answer(
            self.status,
            self.message,
            self.code,
            self.param,
            self.retry_after,
            {**self.headers, **(extra_headers or {})},
        )

    def response(self) -> web.Response:
        return error_response(
            self.status, self.message, self.code, self.param, self.retry_after, self.headers
        )


def unavailable(error: ModelUnavailable, show_tail: bool = True) -> ApiError:
    """The one mapping of "the model cannot serve now" to an HTTP error: its status, its code,
    the engine's last log lines for an admin (`show_tail`), all masked, and a `Retry-After` on
    every 5xx (a 409, such as a sleep asked of a model that cannot sleep, is not helped by
    retrying)."""
    message = str(error)
    if error.log_tail and show_tail:
        message += "\nlast engine log lines:\n" + "\n".join(error.log_tail[-10:])
    message = redact(message)  # engines' output is masked like every other output
    if not show_tail:
        message = without_addresses(message)  # only admins learn where engines run
    retry_after: float | None = 5.0 if error.retry_after is None else error.retry_after
    if error.status < 500:
        retry_after = None
    return ApiError(error.status, message, error.code, retry_after=retry_after)


def with_log_tail(message: str, tail: list[str], show_tail: bool = False) -> str:
    """An engine failure's message; only an admin (`show_tail`) sees the engine's log lines,
    masked: a user learns that the engine failed, not how it was started, what it printed or
    where it runs."""
    message = redact(message)
    if not show_tail:
        return without_addresses(message)
    if not tail:
        return message
    return redact(message + "\nlast engine log lines:\n" + "\n".join(tail[-10:]))
