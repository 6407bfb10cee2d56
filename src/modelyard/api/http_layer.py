"""Errors made by the HTTP server itself (bad request lines, bad headers, headers too long)
answered in OpenAI's shape like every other error, without quoting the offending bytes.

aiohttp answers these before any middleware runs, as plain text that can echo the request
(an oversized `Authorization` header included). Its protocol handler is swapped for one that
answers `{"error": {...}}`; its log line is cut short by `observability.log_guard`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from modelyard.api.errors import error_response


class OpenAIErrorProtocol(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if already sent
        if status >= 500:
            text, code = "internal gateway error; see the gateway log", "internal_error"
        else:
            text, code = _describe(exc, status), "bad_request"
        response = error_response(status, text, code)
        response.force_close()
        return response


def _describe(exc: BaseException | None, status: int) -> str:
    name = type(exc).__name__ if exc is not None else ""
    reasons = {
        "LineTooLong": "a request line or header is too long",
        "BadHttpMethod": "the request method is not valid HTTP",
        "BadStatusLine": "the request line is not valid HTTP",
        "InvalidHeader": "a request header is not valid HTTP",
        "InvalidURLError": "the request target is not a valid URL",
        "TransferEncodingError": "the request's transfer encoding is not valid",
        "ContentLengthError": "the request's Content-Length is not valid",
    }
    return f"malformed HTTP request: {reasons.get(name, 'it could not be parsed')} ({status})"


class OpenAIErrorServer(Server):
    __slots__ = ()

    def __call__(self) -> RequestHandler:
        return OpenAIErrorProtocol(self, loop=self._loop, **self._kwargs)


def use_openai_errors(runner: web.AppRunner) -> None:
    """After `runner.setup()`: protocol errors are answered in OpenAI's shape."""
    server: Any = runner.server
    if server is not None and type(server) is Server:
        server.__class__ = OpenAIErrorServer
