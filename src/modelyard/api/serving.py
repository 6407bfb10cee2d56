"""Routes that serve models: OpenAI's `/v1/...`, the seeds' `/{route}/...`, `/upstream/...`."""

from __future__ import annotations

import contextlib
import json
import re
import time
from typing import Any

from aiohttp import web

from modelyard.api.bodies import model_field, parse_json_object, read_body
from modelyard.api.errors import ApiError
from modelyard.api.principal import Principal, principal_of
from modelyard.gateway import Gateway, RequestRecord
from modelyard.lora.manager import AdapterError
from modelyard.proxy.forward import UpstreamError, UpstreamTimeout
from modelyard.proxy.sse import (
    StreamTransformer,
    model_name_replacements,
    rewrite_model_in_json,
)
from modelyard.scheduler.supervisor import ModelUnavailable
from modelyard.scheduler.yard import Target, UnknownModel

GATEWAY_KEY = web.AppKey("gateway", Gateway)


def gateway_of(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]


def resolve(gateway: Gateway, name: str, principal: Principal | None = None) -> Target:
    try:
        return gateway.yard.resolve(name)
    except UnknownModel as error:
        # Only the names this key may use: the error must not list other keys' models.
        usable = [
            known
            for known in error.known
            if principal is None or principal.may_use(gateway.yard.resolve(known))
        ]
        known = ", ".join(usable) or "(none configured)"
        raise ApiError(
            404, f"model {name!r} does not exist; known models: {known}", "model_not_found", "model"
        ) from None


async def openai_model_route(request: web.Request) -> web.StreamResponse:
    """POST /v1/<anything>: the `model` field picks the engine."""
    gateway = gateway_of(request)
    body = await read_body(request, gateway.config.limits.max_body_bytes)
    payload = parse_json_object(body)
    target = resolve(gateway, model_field(payload), principal_of(request))
    return await proxy_json(
        request,
        gateway,
        target,
        "/v1/" + request.match_info["tail"],
        payload,
        body,
        route_label="/v1/" + request.match_info["tail"].split("/")[0],
    )


async def seed_route(request: web.Request) -> web.StreamResponse:
    """`/{route}/...` (the seed 000's `/coder/v1/chat/completions`, `/vision/generate`)."""
    gateway = gateway_of(request)
    route, tail = request.match_info["route"], request.match_info["tail"]
    model = gateway.yard.model_for_route(route)
    if model is None:
        raise ApiError(
            404,
            f"no route /{route}; routes: "
            + ", ".join(sorted(f"/{r}" for r in gateway.yard.routes())),
            "route_not_found",
        )
    target = gateway.yard.resolve(model)
    if tail in ("v1/models", "v1/models/") and request.method == "GET":
        principal_of(request).require_model(target)
        return web.json_response(model_listing(gateway, only=model))
    body = await read_body(request, gateway.config.limits.max_body_bytes)
    label = f"/{route}/" + tail.split("/")[0]
    if request.method == "POST" and tail.startswith("v1/") and body:
        payload = parse_json_object(body)
        asked = payload.get("model")
        chosen = _route_target(gateway, target, asked)
        return await proxy_json(request, gateway, chosen, "/" + tail, payload, body, label)
    return await proxy_raw(request, gateway, target, "/" + tail, body, label)


def _route_target(gateway: Gateway, base: Target, asked: object) -> Target:
    # The route decides the engine "whatever model says" (seed 000); an adapter of that same
    # base model is the one exception, so LoRA fine-tunes work behind a route too.
    if isinstance(asked, str):
        try:
            candidate = gateway.yard.resolve(asked)
        except UnknownModel:
            candidate = None
        if candidate is not None and candidate.model == base.model:
            return candidate
    return base


async def upstream_route(request: web.Request) -> web.StreamResponse:
    """`/upstream/{model}/{path}`: any engine path, after starting the engine."""
    gateway = gateway_of(request)
    target = resolve(gateway, request.match_info["model"], principal_of(request))
    body = await read_body(request, gateway.config.limits.max_body_bytes)
    return await proxy_raw(
        request, gateway, target, "/" + request.match_info["tail"], body, "/upstream"
    )


async def proxy_json(
    request: web.Request,
    gateway: Gateway,
    target: Target,
    path: str,
    payload: dict[str, Any],
    body: bytes,
    route_label: str,
) -> web.StreamResponse:
    """Forward an OpenAI-style JSON request, rewriting model names both ways when aliased."""
    principal_of(request).require_model(target)
    principal_of(request).require_engine_path(path)
    usage_added = _ask_stream_for_usage(path, payload)
    if payload.get("model") != target.upstream_name or usage_added:
        payload["model"] = target.upstream_name
        body = json.dumps(payload).encode()
    replacements = model_name_replacements(target.upstream_name, target.public_name)
    tokens = TokenCount(gateway, principal_of(request).name, target.model)

    def transformer() -> StreamTransformer | None:
        # Usage is always read for the token metrics; the usage-only chunk that we asked
        # for on the client's behalf is dropped, so the client sees the stream it asked for.
        return StreamTransformer(
            replacements,
            capture_usage=True,
            drop_usage_only_chunk=usage_added,
            on_final_usage=tokens.count,
        )

    rewrite = (lambda data: rewrite_model_in_json(data, replacements)) if replacements else None
    return await _forward(
        request, gateway, target, path, body, route_label, transformer, rewrite, tokens
    )


def _ask_stream_for_usage(path: str, payload: dict[str, Any]) -> bool:
    """Add `stream_options.include_usage` to a completion stream that lacks it (for token
    metrics); True when added. Engines send usage in a last chunk with no choices."""
    if payload.get("stream") is not True or not path.endswith("/completions"):
        return False
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return False  # malformed: the engine's own error is the right answer
    if options and options.get("include_usage") is True:
        return False
    payload["stream_options"] = {**(options or {}), "include_usage": True}
    return True


async def proxy_raw(
    request: web.Request,
    gateway: Gateway,
    target: Target,
    path: str,
    body: bytes,
    route_label: str,
) -> web.StreamResponse:
    """Forward any request unchanged (seed routes such as /vision/generate, /upstream).

    One exception: a streamed completion gets `stream_options.include_usage` added (and the
    extra chunk removed), as on `/v1`, so its tokens count for the key's budget and limits:
    `/upstream/{model}/v1/chat/completions` must not be a way around them."""
    principal_of(request).require_model(target)
    principal_of(request).require_engine_path(path)
    tokens = TokenCount(gateway, principal_of(request).name, target.model)
    transformer: Any = lambda: None  # noqa: E731 - the unchanged case
    if request.method == "POST" and body and path.split("?", 1)[0].endswith("/completions"):
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            payload = None  # the engine's own error is the right answer
        if isinstance(payload, dict) and payload.get("stream") is True:
            usage_added = _ask_stream_for_usage(path.split("?", 1)[0], payload)
            if usage_added:
                body = json.dumps(payload).encode()

            def transformer() -> StreamTransformer | None:
                return StreamTransformer(
                    [],
                    capture_usage=True,
                    drop_usage_only_chunk=usage_added,
                    on_final_usage=tokens.count,
                )

    return await _forward(
        request, gateway, target, path, body or None, route_label, transformer, None, tokens
    )


class TokenCount:
    """One request's usage for its key (budgets, tokens per minute, usage per model): counted
    once, as early as it is known."""

    def __init__(self, gateway: Gateway, key_name: str, model: str) -> None:
        self._gateway = gateway
        self._key_name = key_name
        self._model = model
        self.counted = False

    def count(self, usage: dict[str, int]) -> None:
        if self.counted or self._gateway.auth is None:
            return
        self.counted = True
        self._gateway.auth.ledger.record(
            self._key_name,
            self._model,
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
        )


async def _forward(
    request: web.Request,
    gateway: Gateway,
    target: Target,
    path: str,
    body: bytes | None,
    route_label: str,
    transformer: Any,
    rewrite: Any,
    tokens: TokenCount,
) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    first_byte: float | None = None
    streamed = False
    usage: dict[str, int] = {}
    try:
        if target.adapter is not None:
            gateway.lora_manager().check(target)  # a bad adapter never starts the engine
        async with contextlib.AsyncExitStack() as stack:
            engine = await stack.enter_async_context(gateway.yard.engine_for(target.model))
            if target.adapter is not None:  # the adapter stays loaded while it serves
                await stack.enter_async_context(gateway.lora_manager().use(target, engine))
            if request.query_string:
                path = f"{path}?{request.query_string}"
            response, outcome = await gateway.upstream.forward(
                request,
                engine.base_url + path,
                body,
                transformer,
                rewrite,
                engine.upstream_headers,
            )
            status, first_byte, streamed = outcome.status, outcome.first_byte_s, outcome.streamed
            usage = outcome.usage or _usage_of(outcome.body)
            return response
    except AdapterError as error:
        status = error.status
        raise ApiError(error.status, str(error), error.code, "model") from None
    except ModelUnavailable as error:
        status = error.status
        raise ApiError(
            error.status,
            _with_log_tail(str(error), error.log_tail),
            error.code,
            retry_after=error.retry_after,
        ) from None
    except UpstreamError as error:
        # 504 for an engine that sent nothing in time (the watchdog counts these as signs of
        # a hung engine), 502 for one that could not be reached or broke off.
        timed_out = isinstance(error, UpstreamTimeout)
        status = 504 if timed_out else 502
        supervisor = gateway.yard.supervisor_of(target.model)
        if not timed_out and gateway.yard.is_remote(target.model):
            # Not ours to restart: forget the connection (the next request checks the
            # server again) and tell the client to come back.
            status = 503
            await supervisor.declare_hung(f"unreachable while serving: {error}")
            raise ApiError(
                503,
                f"model {target.model!r}: the remote engine is not answering ({error}); "
                "retry later",
                "remote_unavailable",
                retry_after=5.0,
            ) from None
        await supervisor.notice_exit(timeout=1.0)
        tail = supervisor.failure.log_tail if supervisor.failure else []
        raise ApiError(
            status,
            _with_log_tail(f"model {target.model!r}: {error}", tail),
            "upstream_timeout" if timed_out else "upstream_error",
        ) from None
    finally:
        tokens.count(usage)  # the answer's usage, unless a stream's was counted already
        gateway.observe(
            RequestRecord(
                model=target.model,
                route=route_label,
                key_name=principal_of(request).name,
                status=status,
                duration_s=time.perf_counter() - started,
                first_byte_s=first_byte,
                streamed=streamed,
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
            )
        )


_USAGE_RE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')


def _usage_of(body: bytes | None) -> dict[str, int]:
    """Token counts from a JSON answer, parsing only its flat `usage` object (an embeddings
    answer can be megabytes of floats: not worth parsing whole for two integers)."""
    match = _USAGE_RE.search(body) if body else None
    if match is None:
        return {}
    try:
        usage = json.loads(match.group(1))
    except ValueError:
        return {}
    return {k: v for k, v in usage.items() if isinstance(v, int)}


def _with_log_tail(message: str, tail: list[str]) -> str:
    if not tail:
        return message
    return message + "\nlast engine log lines:\n" + "\n".join(tail[-10:])


def model_listing(
    gateway: Gateway, only: str | None = None, principal: Principal | None = None
) -> dict[str, Any]:
    """GET /v1/models: every configured name the key may use, answered at once (never waits
    for an engine)."""
    yard = gateway.yard
    created = int(gateway.started_at)
    data = []
    for public in yard.public_names():
        target = yard.resolve(public)
        if only is not None and target.model != only:
            continue
        if principal is not None and not principal.may_use(target):
            continue
        if target.adapter is not None and not gateway.adapter_servable(target.adapter):
            continue  # refused adapters answer requests with their problem, but are not listed
        supervisor = yard.supervisors[target.model]
        entry: dict[str, Any] = {
            "id": public,
            "object": "model",
            "created": created,
            "owned_by": "modelyard",
            "root": target.model,
            "parent": target.model if target.adapter else None,
            "state": supervisor.state.value,
        }
        if public != target.model and target.adapter is None:
            entry["alias_of"] = target.model
        data.append(entry)
    return {"object": "list", "data": data}


async def list_models(request: web.Request) -> web.Response:
    listing = model_listing(gateway_of(request), principal=principal_of(request))
    return web.json_response(listing)


async def get_model(request: web.Request) -> web.Response:
    gateway = gateway_of(request)
    name = request.match_info["name"]
    target = resolve(gateway, name, principal_of(request))
    principal_of(request).require_model(target)
    listing = model_listing(gateway)["data"]
    for entry in listing:
        if entry["id"] == name:
            return web.json_response(entry)
    for entry in listing:
        if entry["id"] == target.model:  # a served name: accepted, though not listed
            return web.json_response({**entry, "id": name, "alias_of": target.model})
    raise ApiError(404, f"model {name!r} does not exist", "model_not_found")
