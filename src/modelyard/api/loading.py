"""A streamed request that waits for its engine to start is never silent.

Its response headers go out at once, then an SSE comment (`: loading coder: 12 s, loading
weights 40 %`) every few seconds until the engine answers: every OpenAI client ignores lines
that start with `:` (the SSE spec says so), while proxies and clients with 30-60 s read
timeouts see bytes and keep the connection. A model (or a request, with the
`X-Modelyard-Loading` header) may also ask for the progress as text a person sees: chat chunks
whose `delta.reasoning_content` says what is loading, as llama-swap's `sendLoadingState` does.

Once the headers are out, an error can no longer be a status code: it is the stream's last
event, in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from aiohttp import web

from modelyard.proxy.sse import error_event

T = TypeVar("T")


class Describes(Protocol):
    """A start's progress as text (`runtime.start_progress.ProgressView`; in a proxy worker,
    what the gateway's process last said)."""

    def describe(self) -> str: ...


# The bound is 5 s between two lines; 3 s leaves room for a slow event loop.
COMMENT_INTERVAL_S = 3.0
# How long a request may take to be admitted or refused before its headers go out: a full
# queue or a model in its crash backoff still answers 503 with Retry-After, not an SSE error.
ADMISSION_GRACE_S = 0.02
LOADING_HEADER = "X-Modelyard-Loading"


def wants_loading_content(request: web.Request, model_default: bool) -> bool:
    """`X-Modelyard-Loading: content` turns the visible progress on for one request,
    `comments` turns it off; otherwise the model's `loading_content` decides."""
    asked = request.headers.get(LOADING_HEADER, "").strip().lower()
    if asked in ("content", "comments"):
        return asked == "content"
    return model_default


class LoadingStream:
    """The client's SSE response while its engine starts; then the engine's stream goes on in
    the same response."""

    def __init__(
        self,
        request: web.Request,
        model: str,
        progress: Callable[[], Describes | None],
        *,
        content: bool,
        chat: bool,
        interval_s: float = COMMENT_INTERVAL_S,
    ) -> None:
        self.request = request
        self.model = model
        self.progress = progress
        self.content = content and chat
        self.interval_s = interval_s
        self.response: web.StreamResponse | None = None
        self._started = time.monotonic()

    async def hold(self, waiting: asyncio.Task[T]) -> T:
        """Wait for `waiting`; once it takes longer than admission, send headers and comments.

        A client that hangs up is the only thing that cancels `waiting` (its place in the
        queue): the start itself goes on for the others."""
        done, _ = await asyncio.wait({waiting}, timeout=ADMISSION_GRACE_S)
        if done:
            return waiting.result()
        try:
            await self._open()
            while True:
                await self._say()
                done, _ = await asyncio.wait({waiting}, timeout=self.interval_s)
                if done:
                    return waiting.result()
        except BaseException:
            waiting.cancel()
            raise

    async def _open(self) -> None:
        if self.response is not None:
            return  # already open: a fallback's wait continues the stream
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            },
        )
        await response.prepare(self.request)
        self.response = response

    def line(self) -> str:
        """`loading coder: 12 s, loading weights 40 % (2/4 shards)`."""
        view = self.progress()
        text = f"loading {self.model}: {time.monotonic() - self._started:.0f} s"
        if view is not None:
            text += f", {view.describe()}"
        return text

    async def _say(self) -> None:
        assert self.response is not None
        text = self.line().replace("\n", " ")
        data = f": {text}\n\n"
        if self.content:
            chunk = {
                "id": "modelyard-loading",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "reasoning_content": text + "\n"},
                        "finish_reason": None,
                    }
                ],
            }
            data += f"data: {json.dumps(chunk)}\n\n"
        await self.response.write(data.encode())

    async def fail(self, message: str, code: str | None) -> web.StreamResponse:
        """End the stream with an OpenAI-shaped error event (the headers said 200)."""
        assert self.response is not None
        try:
            await self.response.write(error_event(message, code or "error"))
            await self.response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client is gone: nothing left to tell
        return self.response
