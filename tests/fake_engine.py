"""A test engine that speaks the parts of vLLM's OpenAI server the gateway relies on.

It stands in for what cannot run in tests: slow or failing starts, crashes on demand, slow
streams, GPU memory claims and vLLM's GPU-only sleep mode. Its wire format follows vLLM's
(`/health`, `/v1/models`, chat/completions/embeddings with SSE chunks and `[DONE]`,
`/sleep?level=N`, `/wake_up`, `/is_sleeping`, runtime LoRA endpoints, the Whisper uploads,
`/tokenize`, `/detokenize`, rerank, score, `/v1/responses`, Anthropic's `/v1/messages`), and
`--max-num-seqs N` caps the requests it serves at once (vLLM queues the rest itself).

Run: python fake_engine.py --port P --served-name NAME [--ready-delay S] [--crash-on-start]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

try:
    from tests.vllm_shapes import (
        chunk_usage,
        reads_true,
        responses_answer,
        responses_events,
        wants_running_usage,
    )
except ImportError:  # run as a script: tests/ is the script's own directory
    from vllm_shapes import (  # type: ignore[no-redef]
        chunk_usage,
        reads_true,
        responses_answer,
        responses_events,
        wants_running_usage,
    )

STATE: dict[str, Any] = {
    "requests": [],
    "disconnects": 0,
    "sleeping": 0,
    "loras": {},
    "in_flight": 0,
}


def _id() -> str:
    return f"cmpl-{time.time_ns()}"


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return web.json_response(body, status=status)


def _known_models(args: argparse.Namespace) -> list[str]:
    return [args.served_name, *STATE["loras"]]


async def health(request: web.Request) -> web.Response:
    args = request.app["args"]
    if args.hang_health and time.monotonic() > request.app["ready_at"]:
        await asyncio.sleep(3600)
    if STATE.get("hung"):
        await asyncio.sleep(3600)
    if time.monotonic() < request.app["ready_at"]:
        return web.Response(status=503)
    return web.Response(status=200)


async def models(request: web.Request) -> web.Response:
    args = request.app["args"]
    data = [
        {
            "id": args.served_name,
            "object": "model",
            "owned_by": "vllm",
            "root": args.root,
            "parent": None,
            "max_model_len": args.max_model_len,
        }
    ]
    data += [
        {
            "id": name,
            "object": "model",
            "owned_by": "vllm",
            "root": path,
            "parent": args.served_name,
        }
        for name, path in STATE["loras"].items()
    ]
    return web.json_response({"object": "list", "data": data})


async def completions(request: web.Request) -> web.StreamResponse:
    args = request.app["args"]
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        return _error(400, "invalid JSON")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    STATE["requests"].append({"path": request.path, "body": body, "headers": dict(request.headers)})
    if STATE["sleeping"]:
        return _error(503, "engine is sleeping")
    if body.get("model") not in _known_models(args):
        return web.json_response(
            {
                "error": {
                    "message": f"The model `{body.get('model')}` does not exist.",
                    "type": "NotFoundError",
                    "param": None,
                    "code": 404,
                }
            },
            status=404,
        )
    if body.get("fake_crash"):
        os._exit(int(body["fake_crash"]))
    if STATE.get("hung") or STATE.get("stalled"):
        await asyncio.sleep(3600)
    if body.get("fake_hang"):  # the process stays alive but answers nothing, /health included
        STATE["hung"] = True
        await asyncio.sleep(3600)
    if body.get("fake_stall"):  # requests get no answer while /health stays 200 (vLLM's case)
        STATE["stalled"] = True
        await asyncio.sleep(3600)
    if body.get("fake_close_port"):
        # The process lives on but its port closes (an API server whose listener died):
        # connections are refused from now on, /health included, and idle kept-alive ones
        # close. This answer still goes out.
        _close_listeners()
        for handler in list(request.protocol._manager.connections):  # type: ignore[union-attr]
            handler.close()  # each ends once its current answer (if any) is out
    if body.get("fake_status"):
        return _error(int(body["fake_status"]), "fake error requested")
    delay = float(body.get("fake_delay", 0))
    chat = request.path.endswith("chat/completions")
    try:
        text = _answer(body, args)
    except (AttributeError, TypeError, IndexError, KeyError):
        return _error(400, "malformed messages or prompt")  # vLLM validates bodies: a 400
    if request.path.endswith("embeddings"):
        await asyncio.sleep(delay)
        return web.json_response(
            {
                "object": "list",
                "model": body["model"],
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0},
            }
        )
    async with request.app["seqs"]:  # vLLM's --max-num-seqs: the rest wait in its queue
        response = await _serve(request, body, text, chat, delay)
    if body.get("fake_close_port"):
        response.force_close()  # and this connection is not kept for another request
    return response


async def _serve(
    request: web.Request, body: dict[str, Any], text: str, chat: bool, delay: float
) -> web.StreamResponse:
    STATE["in_flight"] += 1
    STATE["peak_in_flight"] = max(STATE.get("peak_in_flight", 0), STATE["in_flight"])
    try:
        if request.path.endswith("/responses"):
            return await _responses(request, body, text, delay)
        if reads_true(body.get("stream")):  # as vLLM's pydantic reads it: "yes" streams
            return await _stream(request, body, text, chat)
        await asyncio.sleep(delay)
        usage = {
            "prompt_tokens": 5,
            "completion_tokens": len(text.split()),
            "total_tokens": 5 + len(text.split()),
        }
        choice: dict[str, Any] = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "reasoning_content": None},
                "finish_reason": "stop",
            }
            if chat
            else {"index": 0, "text": text, "finish_reason": "stop"}
        )
        return web.json_response(
            {
                "id": _id(),
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [choice],
                "usage": usage,
                "kv_transfer_params": None,
            },
            dumps=lambda obj: json.dumps(obj, separators=(",", ":")),
        )
    finally:
        STATE["in_flight"] -= 1


def _close_listeners() -> None:
    """Stop listening; connections already open go on. `web.run_app` keeps its sites to
    itself, so they are found among live objects (a test engine's shortcut)."""
    import gc

    for site in [o for o in gc.get_objects() if isinstance(o, web.TCPSite)]:
        server = site._server  # the asyncio.Server, listening
        if server is not None:
            server.close()


def _answer(body: dict[str, Any], args: argparse.Namespace) -> str:
    if "messages" in body:
        last = body["messages"][-1].get("content", "") if body["messages"] else ""
    elif "input" in body:  # /v1/responses: a string or a list of messages
        given = body["input"]
        last = given if isinstance(given, str) else given[-1].get("content", "")
    else:
        last = body.get("prompt", "")
    # The model field names the base or one of its LoRA adapters, as in vLLM.
    return f"{body.get('model', args.served_name)} says: {last}"


async def _stream(
    request: web.Request, body: dict[str, Any], text: str, chat: bool
) -> web.StreamResponse:
    chunks = int(body.get("fake_chunks", 5))
    interval = float(body.get("fake_chunk_delay", 0.01))
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
            delta = {"content": word + " "} if chat else None
            choice: dict[str, Any] = (
                {"index": 0, "delta": delta, "finish_reason": None}
                if chat
                else {"index": 0, "text": word + " ", "finish_reason": None}
            )
            event = {
                "id": "chunk",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [choice],
                "seq": index,
            }
            if running_usage:
                event["usage"] = chunk_usage(index + 1)
            await response.write(f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode())
            await asyncio.sleep(interval)
        if reads_true((body.get("stream_options") or {}).get("include_usage")):
            usage = {
                "id": "chunk",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": chunks,
                    "total_tokens": 5 + chunks,
                },
            }
            await response.write(f"data: {json.dumps(usage, separators=(',', ':'))}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        STATE["disconnects"] += 1
        _write_report(request.app["args"])
        raise
    return response


async def transcribe(request: web.Request) -> web.Response:
    """vLLM's Whisper routes: a multipart form with `file` and `model`; `{"text": ...}`."""
    from aiohttp import BodyPartReader, MultipartReader
    from aiohttp.base_protocol import BaseProtocol
    from aiohttp.streams import StreamReader

    raw = await request.read()  # read once by the wiretap
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), limit=len(raw) + 1, loop=loop)  # never pauses
    stream.feed_data(raw)
    stream.feed_eof()
    form: dict[str, bytes] = {}
    reader = MultipartReader(request.headers, stream)
    while (part := await reader.next()) is not None:
        assert isinstance(part, BodyPartReader)
        form[part.name or ""] = await part.read()
    model = form.get("model", b"").decode()
    STATE["requests"].append({"path": request.path, "form_model": model})
    if model not in _known_models(request.app["args"]):
        return _error(404, f"The model `{model}` does not exist.")
    return web.json_response({"text": f"{len(form.get('file', b''))} bytes of audio"})


async def other_route(request: web.Request) -> web.StreamResponse:
    """vLLM's other model routes, each in its answer's shape (values made up)."""
    body = await request.json()
    STATE["requests"].append({"path": request.path, "body": body})
    model = body.get("model")
    if model not in _known_models(request.app["args"]):
        return _error(404, f"The model `{model}` does not exist.")
    path = request.path
    if path == "/v1/audio/speech":
        return web.Response(body=b"RIFF" + bytes(40), content_type="audio/wav")
    if path == "/tokenize":
        tokens = list(range(len(str(body.get("prompt") or "").split())))
        return web.json_response({"count": len(tokens), "max_model_len": 4096, "tokens": tokens})
    if path == "/detokenize":
        return web.json_response({"prompt": " ".join(f"t{t}" for t in body.get("tokens", []))})
    if path in ("/v1/rerank", "/v1/score"):
        documents = body.get("documents") or body.get("text_2") or []
        usage = {"total_tokens": 3 * len(documents)}
        if path == "/v1/rerank":
            results = [
                {"index": i, "relevance_score": 1.0 / (i + 1)} for i in range(len(documents))
            ]
            return web.json_response(
                {"id": "rerank-1", "model": model, "usage": usage, "results": results}
            )
        data = [{"index": i, "object": "score", "score": 0.5} for i in range(len(documents))]
        return web.json_response({"object": "list", "model": model, "data": data, "usage": usage})
    if path == "/v1/responses":
        content = [{"type": "output_text", "text": f"{model} says: hi", "annotations": []}]
        output = [{"type": "message", "role": "assistant", "content": content}]
        usage = {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}
        return web.json_response(
            {"object": "response", "model": model, "output": output, "usage": usage}
        )
    messages = body.get("messages") or [{}]  # /v1/messages: Anthropic's shape
    return web.json_response(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [
                {"type": "text", "text": f"{model} says: {messages[-1].get('content', '')}"}
            ],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 5, "output_tokens": 3},
        }
    )


async def _responses(
    request: web.Request, body: dict[str, Any], text: str, delay: float
) -> web.StreamResponse:
    """`/v1/responses` in vLLM's shapes (tests/vllm_shapes.py), plain or streamed."""
    if not reads_true(body.get("stream")):
        await asyncio.sleep(delay)
        return web.json_response(responses_answer(body["model"], text))
    chunks = int(body.get("fake_chunks", 5))
    interval = float(body.get("fake_chunk_delay", 0.01))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        for event in responses_events(body["model"], (text.split() * chunks)[:chunks]):
            await response.write(event)
            await asyncio.sleep(interval)
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        STATE["disconnects"] += 1
        raise
    return response


async def sleep(request: web.Request) -> web.Response:
    if not request.app["args"].sleep_mode or request.app["args"].sleep_404:
        return web.Response(status=404)  # vLLM built or started without sleep mode
    level = int(request.query.get("level", "1"))
    if STATE["in_flight"]:
        STATE["aborted_by_sleep"] = STATE.get("aborted_by_sleep", 0) + STATE["in_flight"]
    STATE["sleeping"] = level
    _claim_gpu(request.app["args"], request.app["args"].sleep_residual)
    _write_report(request.app["args"])
    return web.Response(status=200)


async def wake_up(request: web.Request) -> web.Response:
    if not request.app["args"].sleep_mode:
        return web.Response(status=404)
    await asyncio.sleep(request.app["args"].wake_delay)
    try:
        _claim_gpu(request.app["args"])
    except Exception as error:
        return _error(500, f"wake failed: {error}")
    STATE["sleeping"] = 0
    STATE["wakes"] = STATE.get("wakes", 0) + 1
    _write_report(request.app["args"])
    return web.Response(status=200)


async def is_sleeping(request: web.Request) -> web.Response:
    return web.json_response({"is_sleeping": bool(STATE["sleeping"])})


async def load_lora(request: web.Request) -> web.Response:
    body = await request.json()
    name, path = body.get("lora_name"), body.get("lora_path")
    if name in STATE["loras"]:
        return _error(400, f"The lora adapter '{name}' has already been loaded.")
    if not path or not os.path.isdir(path):
        return _error(400, f"No adapter found for {path}")
    STATE["loras"][name] = path
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora(request: web.Request) -> web.Response:
    body = await request.json()
    name = body.get("lora_name")
    if name not in STATE["loras"]:
        return _error(404, f"The lora adapter '{name}' cannot be found.")
    del STATE["loras"][name]
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def seen(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "requests": len(STATE["requests"]),
            "disconnects": STATE["disconnects"],
            "last": STATE["requests"][-1] if STATE["requests"] else None,
            "pid": os.getpid(),
            "memory": request.app["args"].memory,
            "sleeping": STATE["sleeping"],
            "argv": request.app["args"].argv,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "loras": sorted(STATE["loras"]),
        }
    )


@web.middleware
async def wiretap(request: web.Request, handler: Any) -> web.StreamResponse:
    """Records exactly what arrived (for the security tests: what the engine received must be
    what the gateway's checks approved). A real engine has no such record; its decoding of
    the request line is the same as this one's (percent-decoding once, as uvicorn does)."""
    if request.path != "/fake/received":
        raw = await request.read()
        STATE.setdefault("received", []).append(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "path": request.path,
                "query": request.query_string,
                "headers": list(request.headers.items()),
                "body": raw.decode(errors="replace"),
            }
        )
    return await handler(request)


async def received(request: web.Request) -> web.Response:
    return web.json_response(STATE.get("received", []))


async def echo_any(request: web.Request) -> web.Response:
    """Any other path (a non-OpenAI route such as the seed's /generate)."""
    raw = await request.read()
    return web.json_response(
        {
            "path": request.path,
            "method": request.method,
            "query": request.query_string,
            "body": raw.decode(errors="replace") or None,
        }
    )


async def prometheus_metrics(request: web.Request) -> web.Response:
    """A few of vLLM's own `vllm:` metrics, in its exposition format."""
    name = request.app["args"].served_name
    labels = f'engine="0",model_name="{name}"'
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{{labels}}} {float(STATE['in_flight'])}\n"
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{{{labels}}} 0.0\n"
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f"vllm:kv_cache_usage_perc{{{labels}}} 0.25\n"
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
        "# TYPE vllm:generation_tokens_total counter\n"
        f"vllm:generation_tokens_total{{{labels}}} {float(len(STATE['requests']) * 5)}\n"
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
        "# TYPE vllm:prompt_tokens_total counter\n"
        f"vllm:prompt_tokens_total{{{labels}}} {float(len(STATE['requests']) * 5)}\n"
    )
    return web.Response(text=text, content_type="text/plain")


@web.middleware
async def _require_api_key(request: web.Request, handler: Any) -> web.StreamResponse:
    """vLLM's `--api-key`: routes under /v1 answer 401 without the key; /health stays open."""
    expected = f"Bearer {request.app['args'].api_key}"
    if request.path.startswith("/v1") and request.headers.get("Authorization") != expected:
        return web.json_response({"error": "Unauthorized"}, status=401)
    result: web.StreamResponse = await handler(request)
    return result


def _write_report(args: argparse.Namespace) -> None:
    if args.report:
        report = {
            "pid": os.getpid(),
            "disconnects": STATE["disconnects"],
            "requests": len(STATE["requests"]),
            "sleeping": STATE["sleeping"],
            "wakes": STATE.get("wakes", 0),
            "aborted_by_sleep": STATE.get("aborted_by_sleep", 0),
        }
        tmp = args.report + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(report, handle)
        os.replace(tmp, args.report)


def _claim_gpu(args: argparse.Namespace, fraction: float = 1.0) -> None:
    """Claim this engine's GPU memory on the simulated GPU (see fake_gpu.py)."""
    ledger = os.environ.get("FAKE_GPU_DIR")
    if not ledger:
        return
    from pathlib import Path

    import fake_gpu

    directory = Path(ledger)
    visible = [int(i) for i in os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",") if i]
    totals = fake_gpu.totals(directory)
    if args.gpu_memory_utilization is not None:
        per_gpu = {
            gpu: int(totals[gpu] * args.gpu_memory_utilization * fraction) for gpu in visible
        }
    else:
        per_gpu = {gpu: int(args.memory * fraction) for gpu in visible}
    # The weights need this much whatever the budget says (the gateway's estimate was low).
    per_gpu = {gpu: max(size, int(args.fake_min_bytes * fraction)) for gpu, size in per_gpu.items()}
    fake_gpu.claim(directory, os.getpid(), per_gpu)


def _vllm_start(args: argparse.Namespace) -> None:
    """Print vLLM's start as it would, at its pace; go silent (and hang) if asked to."""
    import vllm_log

    began = time.monotonic()
    for at, line in vllm_log.vllm_start_lines(args.vllm_start, download=args.download):
        if args.silent_after is not None and at >= args.silent_after:
            time.sleep(3600)  # alive, silent, never ready: a hung start
        time.sleep(max(0.0, began + at - time.monotonic()))
        print(line, flush=True)
        if args.download_to and "%|" in line and ".safetensors" in line:
            folder = Path(args.download_to) / "blobs"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "shard.incomplete", "ab") as partial:
                partial.write(b"\0" * 100_000)  # the download folder grows


def _grow_quietly(folder: Path, seconds: float) -> None:
    """A download that logs nothing: only its cache folder shows it goes on."""
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        with open(folder / "blobs" / "weights.incomplete", "ab") as partial:
            partial.write(b"\0" * 1_000_000)
        time.sleep(0.5)


def _lie_forever() -> None:
    """An engine whose log never stops claiming progress and never comes up: a download of
    ever new files, each bar climbing, and a flood of other lines between them."""
    step = 0
    while True:
        for _ in range(20):
            print("INFO 12-07 03:00:00 [core.py:1] still working " + "x" * 500, flush=True)
        print(f"shard-{step}.safetensors:  {step % 100}%|█| 1G/9G [00:01<00:09]", flush=True)
        step += 1
        time.sleep(0.05)


async def _slow_exit(app: web.Application) -> None:
    # The port is closed by now; the process (and so its GPU memory) lingers, as a real
    # engine's does while CUDA tears down.
    await asyncio.sleep(app["args"].exit_delay)


def main() -> None:
    parser = argparse.ArgumentParser()
    # vLLM's own command line (`vllm serve MODEL --host H --port P --served-model-name N ...`)
    # so tests can run this engine with `engine: vllm` and check the flags the gateway sets.
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name", dest="served_name")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--enable-sleep-mode", dest="sleep_mode", action="store_true")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-loras", type=int, default=1)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-cpu-loras", type=int, default=None)
    parser.add_argument("--lora-modules", nargs="+", default=[])
    parser.add_argument(
        "--sleep-residual",
        type=float,
        default=0.05,
        help="fraction of its memory a sleeping engine keeps on the GPU",
    )
    parser.add_argument("--fake-min-bytes", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-name", default="fake")
    parser.add_argument("--root", default="/models/fake")
    parser.add_argument(
        "--ready-delay",
        type=float,
        default=0.0,
        help="seconds before /health turns 200 (port opens at once)",
    )
    parser.add_argument(
        "--bind-delay",
        type=float,
        default=0.0,
        help="seconds before the port opens (vLLM opens it only when ready)",
    )
    parser.add_argument(
        "--vllm-start",
        type=float,
        default=0.0,
        help="seconds of vLLM's own start log lines (tests/vllm_log.py) before the port opens",
    )
    parser.add_argument(
        "--download", action="store_true", help="with --vllm-start: the weights download first"
    )
    parser.add_argument(
        "--download-to", help="with --download: a folder that grows as the download goes"
    )
    parser.add_argument(
        "--quiet-download",
        type=float,
        default=0.0,
        help="with --download-to: S seconds of a growing folder and no log line at all",
    )
    parser.add_argument(
        "--silent-after", type=float, default=None, help="print nothing more after S seconds"
    )
    parser.add_argument(
        "--lying-log",
        action="store_true",
        help="never come up; print climbing download bars and other lines forever",
    )
    parser.add_argument("--crash-on-start", type=int, default=0, help="exit with this code")
    parser.add_argument("--hang-health", action="store_true")
    parser.add_argument("--sleep-mode", action="store_true")
    parser.add_argument("--wake-delay", type=float, default=0.05)
    parser.add_argument("--sleep-404", action="store_true", help="/sleep answers 404")
    parser.add_argument("--memory", type=int, default=0, help="GPU bytes this engine claims")
    parser.add_argument("--report", help="file to write counters to (for tests)")
    parser.add_argument(
        "--spawn-child",
        action="store_true",
        help="start a child process too, like vLLM's engine core",
    )
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument(
        "--exit-delay",
        type=float,
        default=0.0,
        help="seconds between SIGTERM and exit (vLLM on a GPU takes seconds to free its memory)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_API_KEY"),
        help="as vLLM: every /v1 route wants 'Authorization: Bearer KEY' (also VLLM_API_KEY)",
    )
    args, ignored = parser.parse_known_args()
    args.argv = sys.argv[1:]
    for module in args.lora_modules:
        name, _, path = module.partition("=")
        STATE["loras"][name] = path

    print(f"fake engine {args.served_name} starting on port {args.port}", flush=True)
    if ignored:
        print(f"ignoring engine flags: {' '.join(ignored)}", flush=True)
    try:
        _claim_gpu(args)
    except Exception as error:  # fake_gpu.OutOfMemory, as vLLM's torch.OutOfMemoryError
        print(f"torch.OutOfMemoryError: {error}", flush=True)
        sys.exit(1)
    if args.crash_on_start:
        print("loading weights...", flush=True)
        print("RuntimeError: CUDA out of memory (fake)", flush=True)
        sys.exit(args.crash_on_start)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.spawn_child:
        import subprocess

        # The child carries the engine's --root in its argv, so a test finds it by its marker.
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", args.root])
    time.sleep(args.bind_delay)
    if args.lying_log:
        _lie_forever()
    if args.quiet_download:
        _grow_quietly(Path(args.download_to), args.quiet_download)
    if args.vllm_start:
        _vllm_start(args)
    app = web.Application(
        middlewares=[wiretap, *([_require_api_key] if args.api_key else [])],
        client_max_size=64 * 1024 * 1024,  # vLLM takes long prompts; aiohttp's default is 1 MiB
    )
    app["args"] = args
    app["ready_at"] = time.monotonic() + args.ready_delay
    app["seqs"] = asyncio.Semaphore(args.max_num_seqs or 1_000_000)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", completions)
    app.router.add_post("/v1/audio/transcriptions", transcribe)
    app.router.add_post("/v1/audio/translations", transcribe)
    for path in ("/v1/audio/speech", "/v1/rerank", "/v1/score", "/tokenize", "/detokenize"):
        app.router.add_post(path, other_route)
    app.router.add_post("/v1/messages", other_route)
    app.router.add_post("/v1/responses", completions)
    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    app.router.add_get("/is_sleeping", is_sleeping)
    app.router.add_post("/v1/load_lora_adapter", load_lora)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora)
    app.router.add_get("/fake/seen", seen)
    app.router.add_get("/fake/received", received)
    app.router.add_get("/metrics", prometheus_metrics)
    app.router.add_route("*", "/{tail:.*}", echo_any)
    if args.exit_delay:
        app.on_cleanup.append(_slow_exit)
    _write_report(args)
    print("INFO:     Application startup complete.", flush=True)
    web.run_app(
        app,
        host=args.host,  # 127.0.0.1 on one machine; the node's address on a Ray cluster
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
