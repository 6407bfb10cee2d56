"""The one HTTP server every request enters through: aiohttp's, with the limits it offers set
from the config, and its own protocol errors answered in OpenAI's shape.

Every connection, with or without TLS, is served by aiohttp's `RequestHandler` (llhttp parses
the request; we parse no HTTP ourselves). What aiohttp enforces for us, from `limits:`:

- a head read deadline (`head_timeout`): aiohttp's keep-alive timer starts when a connection
  opens and again when an answer ends, and is not pushed back by bytes that arrive; a
  connection still without a complete request head when it fires is closed. So a client that
  sends one header line every few seconds is dropped, as is an idle keep-alive connection;
- the size of the request line and of each header (`max_line_size`, `max_field_size`) and the
  number of headers (`max_headers`): beyond them, a 400 and the connection closed;
- back-pressure: a request is read while it is handled, and a pipelining client that does not
  read its answers stops being read once a few requests wait (aiohttp pauses the transport);
- the body limit while reading (`api.bodies.read_body`, after the key was checked).

aiohttp answers protocol errors itself, before any middleware runs, as plain text that can
echo the request (an oversized `Authorization` header included). Its handler's `handle_error`
(a public method of the exported `web.RequestHandler`) is overridden to answer
`{"error": {...}}` instead; the listener is made with asyncio's `create_server` and a factory
of that handler, not by swapping the class of aiohttp's server object.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from modelyard.api.errors import error_response

if TYPE_CHECKING:  # kept out of light importers (proxy workers)
    from modelyard.config.schema import LimitsConfig

# The request line and each header (aiohttp's default): a key, a cookie, a long query fit.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 100  # aiohttp's default is 128; OpenAI's SDK sends about a dozen
BACKLOG = 2048


@dataclass(frozen=True)
class ConnectionLimits:
    """The per-connection limits aiohttp enforces, as its `RequestHandler` arguments."""

    head_timeout: float
    max_line_size: int = MAX_LINE_BYTES
    max_field_size: int = MAX_LINE_BYTES
    max_headers: int = MAX_HEADERS

    @classmethod
    def from_config(cls, limits: LimitsConfig) -> ConnectionLimits:
        return cls(head_timeout=limits.head_timeout)

    def handler_arguments(self) -> dict[str, Any]:
        return {
            "keepalive_timeout": self.head_timeout,
            "max_line_size": self.max_line_size,
            "max_field_size": self.max_field_size,
            "max_headers": self.max_headers,
        }


class OpenAIErrorProtocol(web.RequestHandler):
    """aiohttp's protocol handler, answering its own protocol errors in OpenAI's shape."""

    def handle_error(
        self,
        request: Any,
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
    if status == 400 and "too many headers" in str(exc).lower():
        return f"malformed HTTP request: too many headers ({status})"
    return f"malformed HTTP request: {reasons.get(name, 'it could not be parsed')} ({status})"


LimitsSource = Callable[[], ConnectionLimits]


def protocol_factory(runner: web.AppRunner, limits: LimitsSource) -> Callable[[], Any]:
    """The protocol factory for a listener: one aiohttp handler per connection, registered
    with the runner's server so a shutdown finds it (after `runner.setup()`). `limits` is
    asked for each new connection, so a reload's limits apply from the next one."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()

    # No access log: requests are logged by the gateway, with model and status.
    quiet: dict[str, Any] = {"access_log": None}

    def make() -> OpenAIErrorProtocol:
        return OpenAIErrorProtocol(server, loop=loop, **quiet, **limits().handler_arguments())

    return make


async def listen(
    runner: web.AppRunner,
    limits: LimitsSource,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """Listen on host:port (or on an already bound `sock`), every connection served by
    aiohttp's handler with `limits`."""
    loop = asyncio.get_running_loop()
    factory = protocol_factory(runner, limits)
    if sock is not None:
        return await loop.create_server(factory, sock=sock, ssl=ssl_context, backlog=BACKLOG)
    return await loop.create_server(
        factory,
        host,
        port,
        ssl=ssl_context,
        backlog=BACKLOG,
        reuse_address=True,
        reuse_port=reuse_port or None,
    )
