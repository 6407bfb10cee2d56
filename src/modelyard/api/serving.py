"""Routes that serve models: OpenAI's `/v1/...`, the seeds' `/{route}/...`, `/upstream/...`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from yarl import URL

from modelyard.api.access import (
    FORBIDDEN_KEY,
    may_use,
    not_found,
    principal_of,
    require_engine_path,
    require_remote_path,
)
from modelyard.api.accounting import (
    TokenCount,
    ask_stream_for_usage,
    finish,
    supports_running_usage,
    usage_of,
)
from modelyard.api.admission import model_refusal, usable_names
from modelyard.api.bodies import (
    looks_like_json_object,
    model_field,
    parse_json_object,
    read_body,
    require_json_content_type,
)
from modelyard.api.errors import ApiError, unavailable, with_log_tail
from modelyard.api.fallbacks import SERVED_BY_HEADER, fallback_for
from modelyard.api.guards import canonical_of
from modelyard.api.loading import LoadingStream, wants_loading_content
from modelyard.api.request_options import engine_reads_true, read_options
from modelyard.auth.principal import Principal
from modelyard.gateway import Gateway
from modelyard.lora.manager import AdapterError
from modelyard.observability.requests import CLIENT_CLOSED_REQUEST
from modelyard.proxy.canonical import engine_path
from modelyard.proxy.forward import ProxyOutcome, UpstreamError, UpstreamTimeout
from modelyard.proxy.sse import (
    StreamTransformer,
    model_name_replacements,
    rewrite_model_in_json,
)
from modelyard.scheduler.names import Target, UnknownModel
from modelyard.scheduler.supervisor import ModelState, ModelUnavailable

GATEWAY_KEY = web.AppKey("gateway", Gateway)


def gateway_of(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]


def _require_path(request: web.Request, gateway: Gateway, target: Target, path: str) -> None:
    """The engine paths this request may reach: control paths for admins, and on a remote
    engine only the OpenAI routes and its `upstream_paths:`."""
    require_engine_path(request, path)
    if gateway.scheduler.is_remote(target.model):
        model = gateway.config.models.get(target.model)
        require_remote_path(path, model.upstream_paths if model is not None else [])


def _require(request: web.Request, gateway: Gateway, target: Target) -> None:
    refusal = model_refusal(gateway, principal_of(request), target)
    if refusal is not None:
        request[FORBIDDEN_KEY] = True  # counted per key by the authentication middleware
        raise refusal


async def openai_model_route(request: web.Request) -> web.StreamResponse:
    """POST /v1/<anything>: the `model` field picks the engine."""
    gateway = gateway_of(request)
    body = await read_body(request, gateway.config.limits)  # 413 first
    require_json_content_type(request)
    payload = parse_json_object(body)
    target = _resolve_listing(request, gateway, model_field(payload))
    path = canonical_of(request).path  # "/v1/..." exactly as checked and as forwarded
    return await proxy_json(
        request, gateway, target, path, payload, body, "/v1/" + path[4:].split("/")[0]
    )


def _resolve_listing(request: web.Request, gateway: Gateway, name: str) -> Target:
    try:
        target = gateway.scheduler.resolve(name)
    except UnknownModel:
        raise not_found(name, usable_names(gateway, principal_of(request))) from None
    _require(request, gateway, target)
    return target


async def seed_route(request: web.Request) -> web.StreamResponse:
    """`/{route}/...` (the seed 000's `/coder/v1/chat/completions`, `/vision/generate`)."""
    gateway = gateway_of(request)
    route, tail = request.match_info["route"], request.match_info["tail"]
    principal = principal_of(request)
    model = gateway.scheduler.model_for_route(route)
    target = gateway.scheduler.resolve(model) if model is not None else None
    if target is None or not may_use(principal, target):
        # Only routes this key may use are named: the others might as well not exist.
        usable = [
            f"/{r}"
            for r in gateway.scheduler.routes()
            if may_use(
                principal, gateway.scheduler.resolve(gateway.scheduler.model_for_route(r) or "")
            )
        ]
        if target is not None:
            request[FORBIDDEN_KEY] = True
        raise ApiError(
            404,
            f"no route /{route}; routes: " + (", ".join(usable) or "(none)"),
            "route_not_found",
        )
    if tail in ("v1/models", "v1/models/") and request.method == "GET":
        return web.json_response(model_listing(gateway, only=target.model, principal=principal))
    label = f"/{route}/" + tail.split("/")[0]
    path = "/" + tail
    if request.method == "POST" and tail.startswith("v1/"):
        body = await read_body(request, gateway.config.limits)
        if body:
            require_json_content_type(request)
            payload = parse_json_object(body)
            chosen = _route_target(gateway, target, payload.get("model"))
            _require(request, gateway, chosen)
            return await proxy_json(request, gateway, chosen, path, payload, body, label)
        return await proxy_raw(request, gateway, target, path, body, label)
    body = await read_body(request, gateway.config.limits)
    return await proxy_raw(request, gateway, target, path, body, label)


def _route_target(gateway: Gateway, base: Target, asked: object) -> Target:
    # The route decides the engine "whatever model says" (seed 000); an adapter of that same
    # base model is the one exception, so LoRA fine-tunes work behind a route too.
    if isinstance(asked, str):
        try:
            candidate = gateway.scheduler.resolve(asked)
        except UnknownModel:
            candidate = None
        if candidate is not None and candidate.model == base.model:
            return candidate
    return base


async def upstream_route(request: web.Request) -> web.StreamResponse:
    """`/upstream/{model}/{path}`: any engine path, after starting the engine."""
    gateway = gateway_of(request)
    target = _resolve_listing(request, gateway, request.match_info["model"])
    principal = principal_of(request)
    if (
        request.method == "GET"
        and request.match_info["tail"] in ("v1/models", "v1/models/")
        and not principal.unrestricted
    ):
        # The engine would list every adapter it has loaded, other keys' included.
        return web.json_response(model_listing(gateway, only=target.model, principal=principal))
    body = await read_body(request, gateway.config.limits)
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
    """Forward an OpenAI-style JSON request, rewriting model names both ways when aliased.

    The engine gets `model` set to the checked target's own name: whatever the client named,
    the engine serves the model that was authorised."""
    _require(request, gateway, target)
    _require_path(request, gateway, target, path)
    key_name = principal_of(request).name
    # One reading of the body's options, for the decisions and the accounting alike.
    options = read_options(path, payload, len(body))
    usage_added = ask_stream_for_usage(path, payload, supports_running_usage(gateway, target.model))

    def forwarding(chosen: Target) -> _Forwarding:
        # A fallback is a request of its own for the key: reserved (or 429) before its engine
        # is asked; the refused attempt's reservation was settled by its own finish.
        tokens = TokenCount(gateway, key_name, chosen.model, options)
        tokens.reserve()  # 429 before any engine is started for it
        data = body
        if payload.get("model") != chosen.upstream_name or usage_added:
            payload["model"] = chosen.upstream_name
            data = json.dumps(payload).encode()
        replacements = model_name_replacements(chosen.upstream_name, chosen.public_name)

        def transformer() -> StreamTransformer | None:
            # Usage is always read for the token metrics; the usage-only chunk that we asked
            # for on the client's behalf is dropped, so the client sees the stream it asked for.
            return StreamTransformer(
                replacements,
                capture_usage=True,
                drop_usage_only_chunk=usage_added.final,
                on_final_usage=tokens.count,
                meter=tokens.served,
                strip_progress_usage=usage_added.running,
            )

        def rewrite(data: bytes) -> bytes:
            return rewrite_model_in_json(data, replacements)

        return _Forwarding(chosen, data, transformer, rewrite if replacements else None, tokens)

    return await _forward(
        request,
        gateway,
        forwarding(target),
        path,
        route_label,
        streamed=engine_reads_true(payload.get("stream")),
        retarget=forwarding,
    )


async def proxy_raw(
    request: web.Request,
    gateway: Gateway,
    target: Target,
    path: str,
    body: bytes,
    route_label: str,
) -> web.StreamResponse:
    """Forward a request as it came (seed routes such as /vision/generate, /upstream), except
    that a JSON body's `model` must name a model this key may use on this same engine, and a
    streamed completion gets `stream_options.include_usage` added (and the extra chunk
    removed), as on `/v1`, so its tokens count for the key's budget and limits:
    `/upstream/{model}/v1/chat/completions` must not be a way around them."""
    _require(request, gateway, target)
    _require_path(request, gateway, target, path)
    target, body = _checked_raw_body(request, gateway, target, body)
    bare_path = path.split("?", 1)[0]
    payload = None
    streamed = False
    if request.method == "POST" and body and looks_like_json_object(body):
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            payload = None  # the engine's own error is the right answer
    tokens = TokenCount(
        gateway,
        principal_of(request).name,
        target.model,
        read_options(bare_path, payload, len(body)) if isinstance(payload, dict) else None,
    )
    tokens.reserve()
    transformer: Any = lambda: None  # noqa: E731 - the unchanged case
    if isinstance(payload, dict) and engine_reads_true(payload.get("stream")):
        streamed = True
        usage_added = ask_stream_for_usage(
            bare_path, payload, supports_running_usage(gateway, target.model)
        )
        if usage_added:
            body = json.dumps(payload).encode()

        def transformer() -> StreamTransformer | None:
            return StreamTransformer(
                [],
                capture_usage=True,
                drop_usage_only_chunk=usage_added.final,
                on_final_usage=tokens.count,
                meter=tokens.served,
                strip_progress_usage=usage_added.running,
            )

    return await _forward(
        request,
        gateway,
        _Forwarding(target, body or None, transformer, None, tokens),
        path,
        route_label,
        streamed=streamed,
    )


def _checked_raw_body(
    request: web.Request, gateway: Gateway, target: Target, body: bytes
) -> tuple[Target, bytes]:
    """Authorization on the model the engine will serve, which the body may name.

    vLLM serves the body's `model` (any adapter or the base on that engine), or its base model
    when the body names none. So for a key limited to some models, or a path naming an
    adapter: the body must be a JSON object, its `model` a model of this engine the key may
    use, and the engine gets that model's own name (an adapter's, when the path named one)."""
    principal = principal_of(request)
    if not body or (principal.unrestricted and target.adapter is None):
        return target, body
    if not looks_like_json_object(body):
        if principal.unrestricted:
            return target, body
        raise ApiError(
            415,
            "with an API key limited to some models, a request body for an engine route must "
            "be a JSON object (so the model it names can be checked)",
            "unsupported_media_type",
        )
    payload = parse_json_object(body)
    asked = payload.get("model")
    if asked is None:
        if target.adapter is None:
            return target, body  # the engine serves its base model: the one checked
        chosen = target
    elif not isinstance(asked, str):
        raise ApiError(400, "'model' must be a non-empty string", "invalid_model", "model")
    elif asked in (target.public_name, target.upstream_name):
        chosen = target
    else:
        chosen = _resolve_listing(request, gateway, asked)
        if chosen.model != target.model:
            raise ApiError(
                400,
                f"the body names model {asked!r}, which this route's engine does not serve",
                "model_mismatch",
                "model",
            )
    if asked == chosen.upstream_name:
        return chosen, body
    payload["model"] = chosen.upstream_name
    return chosen, json.dumps(payload).encode()


@dataclass
class _Loading:
    """The loading stream of one request, once one was opened."""

    stream: LoadingStream | None = None


@dataclass
class _Forwarding:
    """What goes to one engine for one request: the body naming its model, and how its
    answer is read back (stream transformer, body rewrite, token count)."""

    target: Target
    body: bytes | None
    transformer: Any
    rewrite: Any
    tokens: TokenCount


async def _forward(
    request: web.Request,
    gateway: Gateway,
    first: _Forwarding,
    path: str,
    route_label: str,
    *,
    streamed: bool = False,
    retarget: Callable[[Target], _Forwarding] | None = None,
) -> web.StreamResponse:
    """Forward to the target's engine; when it is refused, to its first fallback that can
    serve now (api/fallbacks.py). The refused attempt is recorded under its own model, with
    its status, and the fallback's answer under the fallback."""
    loading = _Loading()
    try:
        return await _forward_once(request, gateway, first, path, route_label, streamed, loading)
    except ApiError as error:
        chosen = None
        client_here = request.transport is not None and not request.transport.is_closing()
        if retarget is not None and client_here:
            chosen = fallback_for(gateway, principal_of(request), first.target, error.code)
        if chosen is not None and retarget is not None:
            gateway.events.emit(
                "fallback",
                first.target.model,
                f"refused ({error.code}): served by {chosen.model}",
                fallback=chosen.model,
                refusal=error.code,
            )
            try:
                return await _forward_once(
                    request,
                    gateway,
                    retarget(chosen),
                    path,
                    route_label,
                    streamed,
                    loading,
                    served_by=chosen.public_name,
                )
            except ApiError as fallback_error:
                error = fallback_error
        if loading.stream is None or loading.stream.response is None:
            raise error from None
        # The client already has a 200 and loading comments: the error is the last event.
        return await loading.stream.fail(error.message, error.code)


async def _engine_for(
    request: web.Request,
    gateway: Gateway,
    target: Target,
    stack: contextlib.AsyncExitStack,
    streamed: bool,
    loading: _Loading,
) -> Any:
    """The ready engine; a streamed request that must wait for a start or wake waits with
    its headers sent and loading comments flowing (api/loading.py)."""
    context = gateway.scheduler.engine_for(target.model)
    if not streamed or gateway.scheduler.state_of(target.model) is ModelState.READY:
        return await stack.enter_async_context(context)
    model = gateway.scheduler.model_config(target.model)
    stream = LoadingStream(
        request,
        target.public_name,
        lambda: gateway.scheduler.start_progress(target.model),
        content=wants_loading_content(request, model.loading_content),
        chat=request.path.endswith("/chat/completions"),
    )
    if loading.stream is not None:
        stream.response = loading.stream.response  # a fallback's wait: the same stream goes on
    loading.stream = stream
    return await stream.hold(asyncio.ensure_future(stack.enter_async_context(context)))


async def _forward_once(
    request: web.Request,
    gateway: Gateway,
    forwarding: _Forwarding,
    path: str,
    route_label: str,
    streamed_request: bool,
    loading: _Loading,
    served_by: str | None = None,
) -> web.StreamResponse:
    target, body, tokens = forwarding.target, forwarding.body, forwarding.tokens
    started = time.perf_counter()
    status = 500
    first_byte: float | None = None
    streamed = False
    client_gone = False
    usage: dict[str, int] = {}
    outcome = ProxyOutcome()
    try:
        if target.adapter is not None:
            gateway.lora_manager().check(target)  # a bad adapter never starts the engine
        async with contextlib.AsyncExitStack() as stack:
            engine = await _engine_for(request, gateway, target, stack, streamed_request, loading)
            if target.adapter is not None:  # the adapter stays loaded while it serves
                await stack.enter_async_context(gateway.lora_manager().use(target, engine))
            # Built from the canonical form: the engine decodes exactly the path that was
            # checked, and gets the query as the client encoded it.
            query = canonical_of(request).query
            url = URL(
                engine.base_url + engine_path(path) + (f"?{query}" if query else ""),
                encoded=True,
            )
            response, outcome = await gateway.upstream.forward(
                request,
                url,
                body,
                forwarding.transformer,
                forwarding.rewrite,
                outcome,
                engine.upstream_headers,
                prepared=loading.stream.response if loading.stream else None,
                answer_headers={SERVED_BY_HEADER: served_by} if served_by else None,
            )
            status, first_byte, streamed = outcome.status, outcome.first_byte_s, outcome.streamed
            if outcome.upstream_broke:
                status = 502  # the client got a 200 header, then an error event
            elif outcome.client_gone:
                client_gone = True
                status = outcome.status or CLIENT_CLOSED_REQUEST
            usage = outcome.usage or usage_of(outcome.body)
            return response
    except AdapterError as error:
        status = error.status
        raise ApiError(error.status, str(error), error.code, "model") from None
    except ModelUnavailable as error:
        status = error.status
        raise unavailable(error, show_tail=principal_of(request).admin) from None
    except (asyncio.CancelledError, ConnectionResetError):
        # The client hung up: not a server error. A stream whose 200 was sent keeps it;
        # otherwise 499, nginx's "client closed request" (issue 11, defect 6).
        client_gone = True
        status = outcome.status or CLIENT_CLOSED_REQUEST
        first_byte, streamed = outcome.first_byte_s, outcome.streamed
        raise
    except UpstreamError as error:
        # 504 for an engine that sent nothing in time (the watchdog counts these as signs of
        # a hung engine), 502 for one that could not be reached or broke off.
        timed_out = isinstance(error, UpstreamTimeout)
        status = 504 if timed_out else 502
        if not timed_out and gateway.scheduler.is_remote(target.model):
            # Not ours to restart: forget the connection (the next request, or the
            # gateway's own check, connects again) and tell the client to come back.
            status = 503
            await gateway.scheduler.forget_remote(
                target.model, f"unreachable while serving: {error}"
            )
            raise ApiError(
                503,
                with_log_tail(
                    f"model {target.model!r}: the remote engine is not answering ({error}); "
                    "retry later",
                    [],
                    principal_of(request).admin,
                ),
                "remote_unavailable",
                retry_after=5.0,
            ) from None
        await gateway.scheduler.notice_exit(target.model, timeout=1.0)
        failure = gateway.scheduler.failure_of(target.model)
        tail = failure.log_tail if failure else []
        raise ApiError(
            status,
            with_log_tail(f"model {target.model!r}: {error}", tail, principal_of(request).admin),
            "upstream_timeout" if timed_out else "upstream_error",
        ) from None
    finally:
        finish(
            gateway,
            tokens,
            model=target.model,
            route=route_label,
            key_name=principal_of(request).name,
            status=status,
            duration_s=time.perf_counter() - started,
            first_byte_s=first_byte,
            streamed=streamed,
            usage=usage,
            client_gone=client_gone,
        )


def model_listing(
    gateway: Gateway, only: str | None = None, principal: Principal | None = None
) -> dict[str, Any]:
    """GET /v1/models: every configured name the key may use, answered at once (never waits
    for an engine)."""
    scheduler = gateway.scheduler
    created = int(gateway.started_at)
    data = []
    for public in scheduler.public_names():
        target = scheduler.resolve(public)
        if only is not None and target.model != only:
            continue
        if principal is not None and not may_use(principal, target):
            continue
        if target.adapter is not None and not gateway.adapter_servable(target.adapter):
            continue  # refused adapters answer requests with their problem, but are not listed
        entry: dict[str, Any] = {
            "id": public,
            "object": "model",
            "created": created,
            "owned_by": "modelyard",
            "root": target.model,
            "parent": target.model if target.adapter else None,
            "state": scheduler.state_of(target.model).value,
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
    target = _resolve_listing(request, gateway, name)
    listing = model_listing(gateway)["data"]
    for entry in listing:
        if entry["id"] == name:
            return web.json_response(entry)
    for entry in listing:
        if entry["id"] == target.model:  # a served name: accepted, though not listed
            return web.json_response({**entry, "id": name, "alias_of": target.model})
    raise ApiError(404, f"model {name!r} does not exist", "model_not_found")
