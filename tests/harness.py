"""An in-process gateway for integration tests: the real app on aiohttp's test server, with
engines that are small aiohttp servers in the test's own event loop instead of processes.

The gateway is served as `modelyard serve` serves it (GatewayServer: aiohttp's server with the
connection limits and OpenAI-shaped protocol errors, on a real loopback port), so raw
sockets, aiohttp and the `openai` SDK reach it the same way.

Most integration tests need the gateway's HTTP behaviour (routes, errors, streaming, the
scheduler's waits), not a process: this runs in milliseconds where `modelyard serve` plus a
Python engine per model takes seconds. What only a real process shows (signals, leaked
processes, exit codes, logs on disk) stays in the process-level tests (tests/conftest.py).

Each engine speaks the parts of vLLM's OpenAI server that the gateway relies on, as
tests/fake_engine.py does: `/health` (503 until ready), `/v1/models`, chat completions with
SSE chunks and `[DONE]`, `/sleep` and `/wake_up` (404 without sleep mode, as vLLM built
without it answers), runtime LoRA load/unload with vLLM's answers (400 "already been
loaded", 404 for an unknown adapter).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from modelyard.api.app import build_app
from modelyard.config import parse_config
from modelyard.engines.base import LaunchSpec, served_name
from modelyard.gateway import Gateway
from modelyard.runtime.process import EngineStartError
from modelyard.server import ServedApp, serve_app
from tests import fake_gpu
from tests.vllm_shapes import (
    chunk_usage,
    reads_true,
    responses_answer,
    responses_events,
    wants_running_usage,
)

_numbers = itertools.count()
COMPACT = (",", ":")  # vLLM writes its SSE chunks as pydantic's compact JSON


@dataclass
class Behaviour:
    """How one model's engines behave (what the real engine would do, at test speed)."""

    ready_after: float = 0.0  # seconds before /health turns 200
    never_ready: bool = False  # alive, /health 503 forever (a hung start)
    crash_on_start: bool = False
    sleep_mode: bool = False
    unload_delay: float = 0.0  # seconds the engine takes to answer an adapter unload
    # Seconds from a stop until the process is gone, and from /sleep or /wake_up until it
    # answers: vLLM on a GPU takes seconds to free its CUDA memory, to move weights to host
    # RAM and back (issue 22's slow stop, sleep and wake).
    exit_after: float = 0.0
    sleep_after: float = 0.0
    wake_after: float = 0.0


@dataclass
class EngineState:
    loras: set[str] = field(default_factory=set)
    requests: int = 0
    in_flight: int = 0
    last: dict[str, Any] | None = None  # the last completion request as it arrived
    received: list[dict[str, Any]] = field(default_factory=list)  # the wiretap's record
    disconnects: int = 0
    sleeping: int = 0
    peak_in_flight: int = 0  # the most requests it served at once


class InProcessEngine:
    """One engine: implements the scheduler's `EngineHandle`."""

    node: str | None = None
    actor_name: str | None = None
    remote = False

    def __init__(
        self, name: str, spec: LaunchSpec, behaviour: Behaviour, served: str | None = None
    ) -> None:
        self.name = name
        # The name the engine serves (vLLM's --served-model-name; tests/fake_engine.py's
        # --served-name): the config's `served_name`, else the model's name.
        self.served = served or spec.expect_served_name or name
        self.spec = spec
        self.behaviour = behaviour
        self.number = next(_numbers)
        self.pid = 4_000_000 + self.number  # no such process: never signalled
        self.health_path = "/health"
        self.upstream_headers = spec.upstream_headers  # the engine's own key, if it wants one
        self.state = EngineState()
        self.exited: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.flags = _vllm_flags(spec.argv)
        # vLLM's --max-num-seqs: the most sequences it runs at once; the others wait in its
        # own queue (first come, first served, whichever key sent them).
        self._seqs = asyncio.Semaphore(self.flags.max_num_seqs or 1_000_000)
        # A simulated GPU (tests/fake_gpu.py), as tests/fake_engine.py claims on it.
        gpu_dir = spec.env.get("FAKE_GPU_DIR")
        self.gpu_dir = Path(gpu_dir) if gpu_dir else None
        self.out_of_memory = False
        self._ready_at = time.monotonic() + max(behaviour.ready_after, self.flags.ready_delay)
        self._server = TestServer(self._app())
        self.port = 0
        self.base_url = ""
        self._lines: list[str] = [f"engine {name} starting"]

    def _claim_gpu(self, fraction: float = 1.0) -> None:
        """Claim this engine's memory on the simulated GPU, as tests/fake_engine.py does (vLLM
        takes --gpu-memory-utilization x each visible GPU's total); raises OutOfMemory."""
        if self.gpu_dir is None:
            return
        visible = [int(i) for i in self.spec.env.get("CUDA_VISIBLE_DEVICES", "0").split(",") if i]
        totals = fake_gpu.totals(self.gpu_dir)
        utilization = self.flags.gpu_memory_utilization or 0.0
        per_gpu = {
            gpu: max(
                int(totals[gpu] * utilization * fraction), int(self.flags.min_bytes * fraction)
            )
            for gpu in visible
        }
        fake_gpu.IN_PROCESS.add(self.pid)
        fake_gpu.claim(self.gpu_dir, self.pid, per_gpu)

    async def start(self) -> None:
        try:
            self._claim_gpu()
        except fake_gpu.OutOfMemory as error:
            # As vLLM (and tests/fake_engine.py): the error in its log, then exit code 1.
            self._lines.append(f"torch.OutOfMemoryError: {error}")
            self.out_of_memory = True
            asyncio.get_running_loop().call_later(0.05, self._exit, 1)
        await self._server.start_server()
        assert self._server.port is not None
        self.port = self._server.port
        self.base_url = f"http://127.0.0.1:{self.port}"
        if self.behaviour.crash_on_start:
            asyncio.get_running_loop().call_later(0.05, self._exit, 1)

    def _exit(self, code: int) -> None:
        if self.gpu_dir is not None:
            fake_gpu.release(self.gpu_dir, self.pid)  # the driver frees a dead process's memory
        if not self.exited.done():
            self.exited.set_result(type("Exit", (), {"code": code})())

    def _ready(self) -> bool:
        if self.behaviour.never_ready or self.behaviour.crash_on_start or self.out_of_memory:
            return False
        return time.monotonic() >= self._ready_at

    async def wait_ready(self, deadline: float) -> float:
        began = time.monotonic()
        while not self._ready():
            if self.exited.done():
                raise EngineStartError(
                    f"engine for {self.name!r} exited while starting", 1, self._lines[-5:]
                )
            if time.monotonic() >= deadline:
                raise EngineStartError(
                    f"engine for {self.name!r} was not ready before the start timeout",
                    None,
                    self._lines[-5:],
                    timed_out=True,
                )
            await asyncio.sleep(0.02)
        return time.monotonic() - began

    async def stop(self, grace: float) -> int | None:
        await self._server.close()
        await asyncio.sleep(self.behaviour.exit_after)
        self._exit(0)
        return 0

    def kill_now(self) -> None:
        self._exit(-9)

    def exit_code(self) -> int | None:
        return self.exited.result().code if self.exited.done() else None

    def crash(self, code: int = -9) -> None:
        """The engine dies (its server goes away, its exit is reported)."""
        self._closing = asyncio.ensure_future(self._server.close())
        self._exit(code)

    def log_tail(self, count: int) -> list[str]:
        return self._lines[-count:]

    def subscribe_log(self, on_line: Callable[[str], None]) -> Callable[[], None]:
        return lambda: None

    def process_gone(self) -> bool:
        return self.exited.done()

    # ----- the engine's HTTP API -----

    def _app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._wiretap],
            client_max_size=64 * 1024 * 1024,  # as tests/fake_engine.py: vLLM takes big bodies
        )
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._chat)
        app.router.add_post("/v1/audio/transcriptions", self._transcribe)
        app.router.add_post("/v1/audio/translations", self._transcribe)
        for path in ("/v1/audio/speech", "/v1/rerank", "/v1/score", "/tokenize", "/detokenize"):
            app.router.add_post(path, self._json_route)
        app.router.add_post("/v1/messages", self._json_route)
        app.router.add_post("/v1/responses", self._chat)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/sleep", self._sleep)
        app.router.add_post("/wake_up", self._wake)
        app.router.add_get("/is_sleeping", self._is_sleeping)
        app.router.add_post("/v1/load_lora_adapter", self._load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self._unload_lora)
        app.router.add_get("/fake/seen", self._seen)
        app.router.add_get("/fake/received", self._received)
        app.router.add_route("*", "/{tail:.*}", self._echo_any)
        return app

    def _served(self) -> str:
        return self.served

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._ready() else 503)

    async def _models(self, request: web.Request) -> web.Response:
        # vLLM's listing: the base model, then each loaded adapter with the base as `parent`.
        base = {
            "id": self._served(),
            "object": "model",
            "owned_by": "vllm",
            "parent": None,
            "max_model_len": 4096,  # vLLM's model card says its context length
        }
        adapters = [
            {"id": n, "object": "model", "owned_by": "vllm", "parent": self._served()}
            for n in sorted(self.state.loras)
        ]
        return web.json_response({"object": "list", "data": [base, *adapters]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        """Chat completions and embeddings in vLLM's shapes, answered as tests/fake_engine.py
        answers (the same text, token counts and usage chunk), so the same assertions hold."""
        body = await request.json()
        self.state.requests += 1
        self.state.last = {"path": request.path, "body": body, "headers": dict(request.headers)}
        model = body.get("model")
        if model not in (self._served(), *self.state.loras):
            return _engine_error(404, f"The model `{model}` does not exist.")
        if body.get("fake_status"):
            return _engine_error(int(body["fake_status"]), "fake error requested")
        if body.get("fake_crash"):
            # The process exits with this code mid-request (tests/fake_engine.py's os._exit):
            # the connection drops unanswered, the exit is reported.
            if request.transport is not None:
                request.transport.abort()
            self.crash(int(body["fake_crash"]))
            await asyncio.sleep(3600)
        if request.path.endswith("embeddings"):
            return web.json_response(
                {
                    "object": "list",
                    "model": model,
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                    "usage": {"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0},
                }
            )
        chunks = int(body.get("fake_chunks", 5))  # tests/fake_engine.py's default
        delay = float(body.get("fake_chunk_delay", 0))
        messages = body.get("messages") or [{}]
        if isinstance(body.get("input"), str):  # /v1/responses
            messages = [{"content": body["input"]}]
        text = f"{model} says: {messages[-1].get('content', '')}"  # as tests/fake_engine.py
        async with self._seqs:
            return await self._serve_chat(request, body, model, text, chunks, delay)

    async def _serve_chat(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        text: str,
        chunks: int,
        delay: float,
    ) -> web.StreamResponse:
        self.state.in_flight += 1
        self.state.peak_in_flight = max(self.state.peak_in_flight, self.state.in_flight)
        try:
            if request.path.endswith("/responses"):
                return await self._responses(request, body, model, text, chunks, delay)
            if reads_true(body.get("stream")):  # as vLLM's pydantic reads it
                return await self._stream(request, body, model, text, chunks, delay)
            # fake_delay: a slow answer (tests/fake_engine.py's), e.g. an engine that sends
            # nothing within the gateway's upstream read timeout.
            await asyncio.sleep(float(body.get("fake_delay", 0)) or delay * chunks)
            words = len(text.split())
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                    "usage": {
                        "prompt_tokens": 5,
                        "completion_tokens": words,
                        "total_tokens": 5 + words,
                    },
                }
            )
        finally:
            self.state.in_flight -= 1

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        text: str,
        chunks: int,
        delay: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = (text.split() * chunks)[:chunks] or [""]
        running_usage = wants_running_usage(body)
        try:
            for index, word in enumerate(words):
                if body.get("fake_break_after") == index and request.transport is not None:
                    # The engine drops the connection mid-stream (a crash, a killed worker).
                    request.transport.abort()
                    return response
                chunk: dict[str, Any] = {
                    "id": "chunk",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": word + " "}}],
                    "seq": index,  # tests/fake_engine.py's: lets a test check order and loss
                }
                if running_usage:
                    chunk["usage"] = chunk_usage(index + 1)
                await response.write(f"data: {json.dumps(chunk, separators=COMPACT)}\n\n".encode())
                await asyncio.sleep(delay)
            if reads_true((body.get("stream_options") or {}).get("include_usage")):
                usage = {
                    "id": "chunk",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 5,
                        "completion_tokens": chunks,
                        "total_tokens": 5 + chunks,
                    },
                }
                await response.write(f"data: {json.dumps(usage, separators=COMPACT)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.state.disconnects += 1
            raise
        return response

    async def _transcribe(self, request: web.Request) -> web.Response:
        """vLLM's Whisper routes: a multipart form with `file` and `model` (and optional
        `language`, `response_format`...); the answer is `{"text": ...}`."""
        raw = await request.read()  # read once by the wiretap; parsed here as vLLM would
        reader = aiohttp.MultipartReader(request.headers, _stream_of(raw))
        form: dict[str, bytes] = {}
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            form[part.name or ""] = await part.read()
        self.state.requests += 1
        self.state.last = {
            "path": request.path,
            "form": {k: v.decode(errors="replace") for k, v in form.items() if k != "file"},
            "file_bytes": len(form.get("file", b"")),
        }
        model = form.get("model", b"").decode()
        if model not in (self._served(), *self.state.loras):
            return _engine_error(404, f"The model `{model}` does not exist.")
        return web.json_response(
            {
                "text": f"{len(form.get('file', b''))} bytes of audio",
                "usage": {"type": "duration", "seconds": 1},
            }
        )

    async def _json_route(self, request: web.Request) -> web.StreamResponse:
        """vLLM's other model routes, each in its answer's shape (the values made up)."""
        body = await request.json()
        self.state.requests += 1
        self.state.last = {"path": request.path, "body": body, "headers": dict(request.headers)}
        model = body.get("model")
        if model not in (self._served(), *self.state.loras):
            return _engine_error(404, f"The model `{model}` does not exist.")
        path = request.path
        if path == "/v1/audio/speech":
            return web.Response(body=b"RIFF" + bytes(40), content_type="audio/wav")
        if path == "/tokenize":
            text = body.get("prompt") or ""
            tokens = list(range(len(str(text).split())))
            return web.json_response(
                {"count": len(tokens), "max_model_len": 4096, "tokens": tokens, "token_strs": None}
            )
        if path == "/detokenize":
            return web.json_response({"prompt": " ".join(f"t{t}" for t in body.get("tokens", []))})
        if path in ("/v1/rerank", "/v1/score"):
            documents = body.get("documents") or body.get("text_2") or []
            results = [
                {"index": i, "relevance_score": 1.0 / (i + 1), "document": {"text": d}}
                for i, d in enumerate(documents)
            ]
            usage = {"total_tokens": 3 * len(documents)}
            if path == "/v1/rerank":
                return web.json_response(
                    {"id": "rerank-1", "model": model, "usage": usage, "results": results}
                )
            data = [{"index": i, "object": "score", "score": 0.5} for i in range(len(documents))]
            return web.json_response(
                {"id": "score-1", "object": "list", "model": model, "data": data, "usage": usage}
            )
        if path == "/v1/responses":
            return web.json_response(
                {
                    "id": "resp_1",
                    "object": "response",
                    "created_at": 0,
                    "model": model,
                    "status": "completed",
                    "output": [
                        {
                            "id": "msg_1",
                            "type": "message",
                            "role": "assistant",
                            "status": "completed",
                            "content": [
                                {
                                    "type": "output_text",
                                    "text": f"{model} says: hi",
                                    "annotations": [],
                                }
                            ],
                        }
                    ],
                    "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8},
                }
            )
        # /v1/messages: Anthropic's Messages shape, as vLLM's Anthropic-compatible route.
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content", "")
        return web.json_response(
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": f"{model} says: {content}"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 3},
            }
        )

    async def _responses(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        text: str,
        chunks: int,
        delay: float,
    ) -> web.StreamResponse:
        """`/v1/responses` as tests/fake_engine.py answers it (tests/vllm_shapes.py)."""
        if not reads_true(body.get("stream")):
            return web.json_response(responses_answer(model, text))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for event in responses_events(model, (text.split() * chunks)[:chunks]):
                await response.write(event)
                await asyncio.sleep(delay)
        except (ConnectionResetError, asyncio.CancelledError):
            self.state.disconnects += 1
            raise
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        """A few of vLLM's own `vllm:` metrics in its exposition format (tests/fake_engine.py's)."""
        labels = f'engine="0",model_name="{self._served()}"'
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} {float(self.state.in_flight)}\n"
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{{{labels}}} 0.25\n"
        )
        return web.Response(text=text, content_type="text/plain")

    @web.middleware
    async def _wiretap(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Records exactly what arrived, as tests/fake_engine.py's wiretap does (the security
        tests: what the engine received must be what the gateway's checks approved). Both
        are aiohttp servers, so the request line is decoded the same way."""
        if request.path != "/fake/received":
            raw = await request.read()
            self.state.received.append(
                {
                    "method": request.method,
                    "raw_path": request.raw_path,
                    "path": request.path,
                    "query": request.query_string,
                    "headers": list(request.headers.items()),
                    "body": raw.decode(errors="replace"),
                }
            )
        response: web.StreamResponse = await handler(request)
        return response

    async def _received(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.received)

    async def _echo_any(self, request: web.Request) -> web.Response:
        """Any other path (a non-OpenAI route such as the seed's /generate), echoed back as
        tests/fake_engine.py echoes it."""
        raw = await request.read()
        return web.json_response(
            {
                "path": request.path,
                "method": request.method,
                "query": request.query_string,
                "body": raw.decode(errors="replace") or None,
            }
        )

    async def _seen(self, request: web.Request) -> web.Response:
        """tests/fake_engine.py's record of what reached the engine (no real engine has it)."""
        state = self.state
        return web.json_response(
            {
                "requests": state.requests,
                "last": state.last,
                "loras": sorted(state.loras),
                "sleeping": state.sleeping,
                "argv": self.spec.argv,
                "cuda_visible_devices": self.spec.env.get("CUDA_VISIBLE_DEVICES"),
            }
        )

    def _sleep_mode(self) -> bool:
        return self.behaviour.sleep_mode or self.flags.enable_sleep_mode

    async def _sleep(self, request: web.Request) -> web.Response:
        if not self._sleep_mode():
            return web.Response(status=404)
        await asyncio.sleep(self.behaviour.sleep_after)
        self.state.sleeping = int(request.query.get("level", "1"))
        self._claim_gpu(self.flags.sleep_residual)  # a sleeping engine keeps a little memory
        return web.Response(status=200)

    async def _is_sleeping(self, request: web.Request) -> web.Response:
        if not self._sleep_mode():
            return web.Response(status=404)
        return web.json_response({"is_sleeping": bool(self.state.sleeping)})

    async def _wake(self, request: web.Request) -> web.Response:
        if not self._sleep_mode():
            return web.Response(status=404)
        await asyncio.sleep(self.behaviour.wake_after)
        try:
            self._claim_gpu()
        except fake_gpu.OutOfMemory as error:
            return _engine_error(500, f"wake failed: {error}")
        self.state.sleeping = 0
        return web.Response(status=200)

    async def _load_lora(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        if name in self.state.loras:
            return _engine_error(400, f"The lora adapter '{name}' has already been loaded.")
        self.state.loras.add(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        await asyncio.sleep(self.behaviour.unload_delay)
        if name not in self.state.loras:
            return _engine_error(404, f"The lora adapter '{name}' cannot be found.")
        self.state.loras.discard(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


@dataclass
class VllmFlags:
    """The parts of vLLM's command line (and tests/fake_engine.py's own flags) that change how
    an engine started with `engine: vllm` behaves here."""

    gpu_memory_utilization: float | None = None
    enable_sleep_mode: bool = False
    sleep_residual: float = 0.05  # tests/fake_engine.py's: the share a sleeping engine keeps
    ready_delay: float = 0.0
    min_bytes: int = 0
    max_num_seqs: int | None = None


def _vllm_flags(argv: list[str]) -> VllmFlags:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--sleep-residual", type=float, default=0.05)
    parser.add_argument("--ready-delay", type=float, default=0.0)
    parser.add_argument("--fake-min-bytes", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    known, _ = parser.parse_known_args(argv)
    return VllmFlags(
        known.gpu_memory_utilization,
        known.enable_sleep_mode,
        known.sleep_residual,
        known.ready_delay,
        known.fake_min_bytes,
        known.max_num_seqs,
    )


def _stream_of(raw: bytes) -> aiohttp.StreamReader:
    loop = asyncio.get_running_loop()
    # Above the body's size: fed at once, it must not ask the (absent) transport to pause.
    stream = aiohttp.StreamReader(BaseProtocol(loop), limit=len(raw) + 1, loop=loop)
    stream.feed_data(raw)
    stream.feed_eof()
    return stream


def _engine_error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return web.json_response(body, status=status)


class InProcessRuntime:
    """Starts `InProcessEngine`s: the scheduler's `EngineStarter`."""

    def __init__(self, behaviours: dict[str, Behaviour] | None = None) -> None:
        self.behaviours = behaviours or {}
        self.engines: list[InProcessEngine] = []
        self.served_names: dict[str, str] = {}  # set from the config by in_process_gateway

    async def __call__(
        self, name: str, spec_for_port: Callable[[int], LaunchSpec]
    ) -> InProcessEngine:
        behaviour = self.behaviours.get(name, Behaviour())
        engine = InProcessEngine(name, spec_for_port(0), behaviour, self.served_names.get(name))
        await engine.start()
        self.engines.append(engine)
        return engine

    def of(self, name: str) -> list[InProcessEngine]:
        return [e for e in self.engines if e.name == name]

    async def close(self) -> None:
        for engine in self.engines:
            await engine.stop(0)


def engine_model(**settings: Any) -> dict[str, Any]:
    """A model entry for the harness (`engine: command`; the runtime never runs it)."""
    return {"engine": "command", "command": ["in-process", "{port}"], **settings}


def vllm_on_gpu(memory: str, gpu: int, **extra: Any) -> dict[str, Any]:
    """A vLLM model entry pinned to one declared GPU, with its memory as given (the harness's
    runtime starts its stand-in; no vLLM runs)."""
    return {
        "engine": "vllm",
        "model": "/models/m",
        "executable": ["vllm"],
        "memory": memory,
        "gpus": [gpu],
        **extra,
    }


async def timed_chat(session: aiohttp.ClientSession, url: str, model: str) -> tuple[int, float]:
    """One chat completion for `model`: its status and how long it took, in seconds."""
    began = time.monotonic()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        await response.read()
        return response.status, time.monotonic() - began


class GatewayServer(TestServer):
    """The app served as `modelyard serve` serves it (src/modelyard/server.py's `serve_app`,
    minus signals and TLS): aiohttp's server with the connection limits and OpenAI-shaped
    protocol errors. So a test here covers the path a real client's request takes."""

    def __init__(self, gateway: Gateway, app: web.Application) -> None:
        super().__init__(app)
        self.gateway = gateway
        self.served: ServedApp | None = None

    async def start_server(self, loop: asyncio.AbstractEventLoop | None = None, **_: Any) -> None:
        if self.runner:
            return
        self.served = await serve_app(self.gateway, self.app, "127.0.0.1", 0)
        self.runner = self.served.runner
        self.port = self.served.port
        self.scheme = "http"
        self._root = URL(f"http://127.0.0.1:{self.port}")

    async def close(self) -> None:
        if self.started and not self.closed:
            assert self.served is not None
            await self.served.close()
            self._root = None
            self.port = None
            self._closed = True


@dataclass
class Harness:
    client: TestClient[web.Request, web.Application]
    gateway: Gateway
    runtime: InProcessRuntime
    records: list[Any]
    closed: bool = False

    async def close(self) -> None:
        """Shut down as `modelyard serve` ends (server.py): the listener, the gateway (it
        stops the engines it runs), then a last kill of anything left."""
        if self.closed:
            return
        self.closed = True
        await self.client.close()
        await self.gateway.close()
        self.gateway.scheduler.kill_engines_now()
        await self.runtime.close()

    @property
    def url(self) -> str:
        """The gateway's base URL on the test server (a real loopback port: raw sockets and
        the `openai` SDK reach it as they reach `modelyard serve`)."""
        server = self.client.server
        return f"http://{server.host}:{server.port}"

    def status(self) -> dict[str, Any]:
        """What `/gateway/status` lists per model, read from the gateway itself (no key)."""
        scheduler = self.gateway.scheduler
        return {
            "queued": scheduler.total_waiting(),
            "models": [self.gateway.model_status(name) for name in scheduler.models()],
            "gpus": self.gateway.gpu_status(),
        }

    def engine_pids(self) -> list[int]:
        """The engines still running (in-process: their made-up pids)."""
        return [e.pid for e in self.runtime.engines if not e.process_gone()]

    def model_state(self, name: str) -> str:
        return str(self.gateway.model_status(name)["state"])

    async def wait_state(self, name: str, state: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.model_state(name) == state:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{name} did not reach {state}; it is {self.model_state(name)}")

    async def chat(self, model: str, **body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
        response = await self.client.post("/v1/chat/completions", json=payload)
        data = await response.json(content_type=None)
        return response.status, data, dict(response.headers)


@contextlib.asynccontextmanager
async def in_process_gateway(
    tmp_path: Path,
    models: dict[str, Any],
    behaviours: dict[str, Behaviour] | None = None,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """The real gateway (scheduler, api, proxy, metrics) on a test server, engines in-process."""
    config = parse_config({"state_dir": str(tmp_path / "state"), "models": models, **settings})
    runtime = InProcessRuntime(behaviours)
    runtime.served_names = {name: served_name(name, m) for name, m in config.models.items()}
    gateway = Gateway.create(config, start_engine=runtime)
    records: list[Any] = []
    gateway.request_observers.append(records.append)
    await gateway.start()
    client = TestClient(GatewayServer(gateway, build_app(gateway)))
    await client.start_server()
    harness = Harness(client, gateway, runtime, records)
    try:
        yield harness
    finally:
        await harness.close()


@contextlib.contextmanager
def in_process_gateway_thread(
    tmp_path: Path,
    models: dict[str, Any],
    behaviours: dict[str, Behaviour] | None = None,
    **settings: Any,
) -> Iterator[Harness]:
    """`in_process_gateway` on its own event loop in a thread, for tests written as a client
    of a separate server (blocking urllib, the sync `openai` SDK, or their own event loop):
    the gateway keeps serving while the test blocks, as `modelyard serve` would."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="in-process-gateway", daemon=True)
    thread.start()
    manager = in_process_gateway(tmp_path, models, behaviours, **settings)
    try:
        harness = asyncio.run_coroutine_threadsafe(manager.__aenter__(), loop).result(60)
        try:
            yield harness
        finally:
            closing = manager.__aexit__(None, None, None)
            asyncio.run_coroutine_threadsafe(closing, loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
