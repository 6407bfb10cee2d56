"""An image server around one `diffusers` text-to-image pipeline: modelyard's `diffusion` engine.

The gateway runs this file by path with the engine venv's Python (the one that has torch and
diffusers), so it imports nothing from modelyard and the gateway never imports torch:

    python diffusion_server.py --model PATH_OR_NAME --port 8011 [--served-name vision]

It loads the pipeline first and only then opens its port, so an open port means ready. Routes:

- `POST /v1/images/generations`: OpenAI's images API (`prompt`, `n`, `size`, `response_format`
  `b64_json`), plus `seed`, `num_inference_steps`, `guidance_scale` and `negative_prompt`.
- `POST /generate`: the seed's API (`prompt`, `num_inference_steps`, `guidance_scale`, `seed`,
  `width`, `height` -> `image_base64`, `seed`, `elapsed`).
- `GET /health`, `GET /healthz`, `GET /v1/models`.

One pipeline call runs at a time, on a single worker thread, so health checks stay answered while
an image is made. At most `--max-queue` requests wait behind it; more get 503 with Retry-After.
The same seed gives the same PNG bytes as long as the device, dtype and `--threads` are the same
(CPU results change with the number of torch threads, GPU results with the GPU model).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import io
import json
import logging
import math
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

LOG = logging.getLogger("modelyard.diffusion")

MIN_SIDE = 64
"""Smallest width or height accepted: below it Stable Diffusion's latents are a few pixels."""

SIDE_MULTIPLE = 8
"""Widths and heights must be multiples of the VAE's scale factor (8 for Stable Diffusion)."""

MAX_PROMPT_CHARS = 4000
"""OpenAI's limit for a prompt; the text encoder only reads its first 77 tokens anyway."""

MAX_GUIDANCE = 50.0
"""Highest `guidance_scale`; far above any useful value, it only catches typos."""

MAX_SEED = 2**32 - 1
"""Seeds are 32-bit unsigned, like most image UIs; -1 or null asks for a random one."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (command-line flags), named in every 400 error."""

    max_steps: int
    max_images: int
    max_queue: int
    max_side: int


@dataclass(frozen=True)
class Defaults:
    """Values used when a request leaves a field out."""

    side: int
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class Job:
    """One validated pipeline call: `n` images, image i made with seed `seed + i`."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    n: int


class BadRequest(Exception):
    """A request the server refuses with 400, in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class QueueFull(Exception):
    """More requests than `--max-queue` are waiting; the client should retry later."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Stopping(Exception):
    """The server is shutting down: the running call stops at its next step."""


# ---------------------------------------------------------------------------------------------
# Request validation (pure functions: body dict in, Job out)


def _as_int(value: Any) -> int | None:
    """`value` as an int if it is one: 20 or 20.0 (JavaScript clients send those), not True."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _field_int(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    """An integer field from `low` to `high`."""
    if body.get(name) is None:
        return default
    value = _as_int(body[name])
    if value is None or not low <= value <= high:
        raise BadRequest(
            f"'{name}' must be an integer from {low} to {high}, got {body[name]!r}", name
        )
    return value


def _field_float(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be a number from {low:g} to {high:g}, got {value!r}", name)
    return float(value)


def _field_prompt(body: dict[str, Any], name: str, required: bool) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise BadRequest(f"'{name}' must be a non-empty string", name)
    if len(value) > MAX_PROMPT_CHARS:
        raise BadRequest(
            f"'{name}' is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}", name
        )
    return value


def _field_seed(body: dict[str, Any]) -> int:
    """The request's seed, or a fresh random one (returned to the client so it can repeat)."""
    value = body.get("seed")
    if value is None or value == -1:
        return secrets.randbelow(MAX_SEED + 1)
    return _field_int(body, "seed", 0, 0, MAX_SEED)


def _field_side(body: dict[str, Any], name: str, default: int, limits: Limits) -> int:
    """A width or height: a multiple of 8 from MIN_SIDE to `--max-side`."""
    if body.get(name) is None:
        return default
    value = _as_int(body[name])
    if value is None or value % SIDE_MULTIPLE or not MIN_SIDE <= value <= limits.max_side:
        raise BadRequest(
            f"'{name}' must be a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to "
            f"{limits.max_side}, got {body[name]!r}",
            name,
        )
    return value


def _parse_size(body: dict[str, Any], limits: Limits, defaults: Defaults) -> tuple[int, int]:
    """OpenAI's `size` ("WIDTHxHEIGHT" or "auto") as (width, height)."""
    size = body.get("size")
    if size is None or size == "auto":
        return defaults.side, defaults.side
    match = re.fullmatch(r"(\d+)x(\d+)", size) if isinstance(size, str) else None
    if match is None:
        raise BadRequest(f"'size' must look like '512x512' (WIDTHxHEIGHT), got {size!r}", "size")
    width, height = int(match[1]), int(match[2])
    for side in (width, height):
        if side % SIDE_MULTIPLE or not MIN_SIDE <= side <= limits.max_side:
            raise BadRequest(
                f"'size' sides must be multiples of {SIDE_MULTIPLE} from {MIN_SIDE} to "
                f"{limits.max_side}, got {size!r}",
                "size",
            )
    return width, height


def _check_formats(body: dict[str, Any]) -> None:
    """Only inline PNG is made: there is no file store behind a URL."""
    response_format = body.get("response_format")
    if response_format == "url":
        raise BadRequest(
            "response_format 'url' is not supported: this server keeps no image files; "
            "use 'b64_json' (the default)",
            "response_format",
            "unsupported_value",
        )
    if response_format not in (None, "b64_json"):
        raise BadRequest(
            f"'response_format' must be 'b64_json', got {response_format!r}", "response_format"
        )
    output_format = body.get("output_format")
    if output_format not in (None, "png"):
        raise BadRequest(
            f"'output_format' must be 'png', got {output_format!r}",
            "output_format",
            "unsupported_value",
        )


def _common_fields(body: dict[str, Any], limits: Limits, defaults: Defaults) -> dict[str, Any]:
    """Fields both APIs share."""
    return {
        "prompt": _field_prompt(body, "prompt", required=True),
        "negative_prompt": _field_prompt(body, "negative_prompt", required=False),
        "steps": _field_int(body, "num_inference_steps", defaults.steps, 1, limits.max_steps),
        "guidance_scale": _field_float(
            body, "guidance_scale", defaults.guidance_scale, 0.0, MAX_GUIDANCE
        ),
        "seed": _field_seed(body),
    }


def parse_openai_request(body: dict[str, Any], limits: Limits, defaults: Defaults) -> Job:
    """Validate a `POST /v1/images/generations` body."""
    _check_formats(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    width, height = _parse_size(body, limits, defaults)
    n = _field_int(body, "n", 1, 1, limits.max_images)
    return Job(width=width, height=height, n=n, **_common_fields(body, limits, defaults))


def parse_seed_request(body: dict[str, Any], limits: Limits, defaults: Defaults) -> Job:
    """Validate a `POST /generate` body (the seed's API: one image, explicit width/height)."""
    width = _field_side(body, "width", defaults.side, limits)
    height = _field_side(body, "height", defaults.side, limits)
    return Job(width=width, height=height, n=1, **_common_fields(body, limits, defaults))


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Pipeline:
    """A loaded diffusers pipeline and what we learned about it."""

    pipe: Any
    device: str
    dtype: str
    native_side: int
    accepts_negative_prompt: bool
    accepts_step_callback: bool


def _dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """Newer diffusers take `dtype` and warn on `torch_dtype`; older ones know only the latter."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _choose_device(requested: str, torch: Any) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _choose_dtype(requested: str, device: str, torch: Any) -> Any:
    """fp16 on a GPU (half the memory, the usual choice for SD); fp32 on CPU, where fp16 is slow."""
    if requested == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, requested)


def _native_side(pipe: Any) -> int:
    """The side the model was trained for (512 for SD 1.5, 1024 for SDXL, 64 for the tiny one)."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    for name in ("unet", "transformer"):
        denoiser = getattr(pipe, name, None)
        sample_size = getattr(getattr(denoiser, "config", None), "sample_size", None)
        if isinstance(sample_size, int):
            return int(sample_size * scale)
    return 512


def _quiet_progress_bars() -> None:
    """Loading bars redraw one line with carriage returns: noise in a captured engine log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(options: argparse.Namespace) -> Pipeline:
    """Load `--model` (a folder, or a hub name; HF_HUB_OFFLINE=1 is honoured by diffusers)."""
    import torch
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    _quiet_progress_bars()
    model = options.model
    if options.threads:
        torch.set_num_threads(options.threads)
    chosen_device = _choose_device(options.device, torch)
    if options.memory_fraction and chosen_device == "cuda":
        # The gateway planned this much of the GPU for us: fail with OOM rather than take more.
        torch.cuda.set_per_process_memory_fraction(options.memory_fraction)
    chosen_dtype = _choose_dtype(options.dtype, chosen_device, torch)
    kwargs = _dtype_kwargs(chosen_dtype)
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(model, **kwargs)
    except (ValueError, KeyError) as error:
        # AutoPipeline knows only the common families; any text-to-image pipeline will do.
        LOG.info(
            "AutoPipelineForText2Image cannot load %s (%s); using DiffusionPipeline", model, error
        )
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    pipe = pipe.to(chosen_device)
    pipe.set_progress_bar_config(disable=True)
    parameters = inspect.signature(pipe.__call__).parameters
    return Pipeline(
        pipe=pipe,
        device=chosen_device,
        dtype=str(chosen_dtype).removeprefix("torch."),
        native_side=_native_side(pipe),
        accepts_negative_prompt="negative_prompt" in parameters,
        accepts_step_callback="callback_on_step_end" in parameters,
    )


def encode_png(image: Any) -> bytes:
    """PNG bytes of a PIL image; PIL writes no timestamp, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def run_job(pipeline: Pipeline, job: Job, stopping: threading.Event) -> list[bytes]:
    """Make the job's images (on the worker thread); raises Stopping when the server stops."""
    import torch

    if stopping.is_set():
        raise Stopping()
    # One CPU generator per image: image i depends only on seed + i, on any device.
    generators = [torch.Generator("cpu").manual_seed(job.seed + index) for index in range(job.n)]
    kwargs: dict[str, Any] = {
        "prompt": job.prompt,
        "width": job.width,
        "height": job.height,
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance_scale,
        "num_images_per_prompt": job.n,
        "generator": generators,
        "output_type": "pil",
    }
    if job.negative_prompt is not None:
        kwargs["negative_prompt"] = job.negative_prompt
    if pipeline.accepts_step_callback:

        def stop_between_steps(pipe: Any, step: int, timestep: Any, tensors: Any) -> Any:
            if stopping.is_set():
                raise Stopping()
            return tensors

        kwargs["callback_on_step_end"] = stop_between_steps
    with torch.inference_mode():
        images = pipeline.pipe(**kwargs).images
    return [encode_png(image) for image in images]


# ---------------------------------------------------------------------------------------------
# One call at a time, a bounded queue behind it


class ImageQueue:
    """Runs jobs one at a time on one worker thread; refuses more than `max_queue` waiting."""

    def __init__(self, pipeline: Pipeline, max_queue: int):
        self.pipeline = pipeline
        self.max_queue = max_queue
        self.stopping = threading.Event()
        self.admitted = 0  # running + waiting; only touched on the event loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._last_seconds = 1.0

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: everyone admitted, at the last call's pace."""
        return max(1, min(600, math.ceil(self._last_seconds * self.admitted)))

    async def submit(self, job: Job) -> tuple[list[bytes], float]:
        """The job's PNGs and the seconds they took, once every job before it has run."""
        if self.stopping.is_set():
            raise Stopping()
        if self.admitted > self.max_queue:
            raise QueueFull(
                f"the image queue is full: 1 request running and {self.admitted - 1} waiting "
                f"(--max-queue {self.max_queue}); retry later",
                self._retry_after(),
            )
        self.admitted += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._timed_run, job)
        finally:
            self.admitted -= 1

    def _timed_run(self, job: Job) -> tuple[list[bytes], float]:
        started = time.monotonic()
        images = run_job(self.pipeline, job, self.stopping)
        elapsed = time.monotonic() - started
        self._last_seconds = elapsed
        LOG.info(
            "made %d image(s) %dx%d, %d steps, seed %d in %.2f s",
            job.n,
            job.width,
            job.height,
            job.steps,
            job.seed,
            elapsed,
        )
        return images, elapsed

    def stop(self) -> None:
        """Stop the running call at its next step; waiting calls answer 503 without running."""
        self.stopping.set()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# HTTP


def error_response(
    status: int, message: str, error_type: str, param: str | None = None, code: str | None = None
) -> web.Response:
    """OpenAI's error shape, which the openai SDK and the gateway both read."""
    error = {"message": message, "type": error_type, "param": param, "code": code}
    return web.json_response({"error": error}, status=status)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(
            f"the request body is not valid JSON: {error}", None, "invalid_json"
        ) from error
    except RecursionError:  # `[[[[...` thousands deep: the client's fault, not a 500
        raise BadRequest("the request body is nested too deeply", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", None, "invalid_json")
    return body


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as OpenAI-shaped JSON with the right status."""
    try:
        return await handler(request)
    except BadRequest as error:
        return error_response(400, error.message, "invalid_request_error", error.param, error.code)
    except QueueFull as error:
        response = error_response(503, str(error), "server_busy", None, "queue_full")
        response.headers["Retry-After"] = str(error.retry_after)
        return response
    except Stopping:
        response = error_response(503, "the image server is shutting down", "server_busy")
        response.headers["Retry-After"] = "5"
        return response
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(error.status, error.reason, "invalid_request_error", None, None)
    except Exception as error:
        LOG.exception("request %s %s failed", request.method, request.path)
        return error_response(500, f"image generation failed: {error!r}", "server_error")


class ImageRoutes:
    """The HTTP handlers; thin, they validate and hand jobs to the queue."""

    def __init__(self, queue: ImageQueue, limits: Limits, defaults: Defaults, served_name: str):
        self.queue = queue
        self.limits = limits
        self.defaults = defaults
        self.served_name = served_name
        self.created = int(time.time())

    async def generations(self, request: web.Request) -> web.Response:
        """OpenAI `POST /v1/images/generations`."""
        job = parse_openai_request(await read_json_object(request), self.limits, self.defaults)
        self._check_supported(job)
        images, _ = await self.queue.submit(job)
        data = [
            {"b64_json": base64.b64encode(png).decode("ascii"), "seed": job.seed + index}
            for index, png in enumerate(images)
        ]
        return web.json_response({"created": int(time.time()), "data": data})

    async def generate(self, request: web.Request) -> web.Response:
        """The seed's `POST /generate`."""
        job = parse_seed_request(await read_json_object(request), self.limits, self.defaults)
        self._check_supported(job)
        images, elapsed = await self.queue.submit(job)
        return web.json_response(
            {
                "image_base64": base64.b64encode(images[0]).decode("ascii"),
                "seed": job.seed,
                "elapsed": round(elapsed, 3),
            }
        )

    def _check_supported(self, job: Job) -> None:
        if job.negative_prompt is not None and not self.queue.pipeline.accepts_negative_prompt:
            raise BadRequest(
                "this model's pipeline does not take a negative_prompt",
                "negative_prompt",
                "unsupported_value",
            )

    async def health(self, request: web.Request) -> web.Response:
        """200 once the pipeline is loaded, which is before the port opens."""
        return web.json_response({"status": "ok"})

    async def healthz(self, request: web.Request) -> web.Response:
        """The seed's health route, with what is loaded and how busy it is."""
        pipeline = self.queue.pipeline
        return web.json_response(
            {
                "status": "ok",
                "model": self.served_name,
                "device": pipeline.device,
                "dtype": pipeline.dtype,
                "native_size": f"{pipeline.native_side}x{pipeline.native_side}",
                "busy": self.queue.admitted,
                "max_queue": self.limits.max_queue,
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        """OpenAI `GET /v1/models`: the one model this server holds."""
        model = {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "modelyard",
        }
        return web.json_response({"object": "list", "data": [model]})


def build_app(
    queue: ImageQueue, limits: Limits, defaults: Defaults, served_name: str
) -> web.Application:
    """The aiohttp application; stopping the app stops the running pipeline call."""
    routes = ImageRoutes(queue, limits, defaults, served_name)
    app = web.Application(middlewares=[openai_errors])
    app.router.add_post("/v1/images/generations", routes.generations)
    app.router.add_post("/generate", routes.generate)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_get("/v1/models", routes.models)

    async def stop_pipeline(app: web.Application) -> None:
        queue.stop()

    async def close_queue(app: web.Application) -> None:
        queue.close()

    app.on_shutdown.append(stop_pipeline)
    app.on_cleanup.append(close_queue)
    return app


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a diffusers text-to-image pipeline.")
    parser.add_argument("--model", required=True, help="pipeline folder or hub name")
    parser.add_argument("--served-name", help="name in /v1/models (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--memory-fraction",
        type=float,
        help="cap this process's share of the GPU's memory (torch's per-process fraction)",
    )
    parser.add_argument("--max-steps", type=int, default=50, help="most num_inference_steps")
    parser.add_argument("--max-images", type=int, default=4, help="most images per request (n)")
    parser.add_argument(
        "--max-queue", type=int, default=8, help="requests waiting beyond the one running"
    )
    parser.add_argument("--max-side", type=int, default=1024, help="largest width or height")
    parser.add_argument("--default-steps", type=int, default=20)
    parser.add_argument("--default-guidance", type=float, default=7.5)
    parser.add_argument(
        "--default-side", type=int, help="default width and height (default: the model's)"
    )
    options = parser.parse_args(argv)
    for flag in ("max_steps", "max_images", "max_side", "default_steps"):
        if getattr(options, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if options.max_queue < 0:
        parser.error("--max-queue must be 0 or more")
    if options.max_side < MIN_SIDE:
        parser.error(f"--max-side must be at least {MIN_SIDE}")
    return options


def _stop_on_sigterm_while_loading() -> None:
    """Loading can take minutes; SIGTERM then should exit at once, not wait for it to finish."""

    def exit_now(signum: int, frame: Any) -> None:
        LOG.info("stopped by signal %d while loading", signum)
        sys.exit(0)

    signal.signal(signal.SIGTERM, exit_now)


def main(argv: list[str] | None = None) -> int:
    """Load the pipeline, then serve until SIGTERM or SIGINT."""
    options = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _stop_on_sigterm_while_loading()
    started = time.monotonic()
    pipeline = load_pipeline(options)
    LOG.info(
        "loaded %s on %s (%s) in %.1f s",
        options.model,
        pipeline.device,
        pipeline.dtype,
        time.monotonic() - started,
    )
    limits = Limits(options.max_steps, options.max_images, options.max_queue, options.max_side)
    side = min(options.default_side or pipeline.native_side, options.max_side)
    side -= side % SIDE_MULTIPLE
    defaults = Defaults(
        side=side,
        steps=min(options.default_steps, options.max_steps),
        guidance_scale=options.default_guidance,
    )
    queue = ImageQueue(pipeline, options.max_queue)
    app = build_app(queue, limits, defaults, options.served_name or options.model)
    web.run_app(
        app,
        host=options.host,
        port=options.port,
        shutdown_timeout=10.0,
        print=lambda message: LOG.info("%s", message),
        access_log=None,
    )
    LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
