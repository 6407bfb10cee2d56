"""Routes that serve models: OpenAI's `/v1/...`, the seeds' `/{route}/...`, `/upstream/...`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NoReturn

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
from modelyard.api.affinity import affinity_key
from modelyard.api.bodies import (
    looks_like_json_object,
    model_field,
    parse_json_object,
    read_body,
    require_json_content_type,
)
from modelyard.api.engine_cards import engine_context_length
from modelyard.api.errors import ApiError, unavailable, with_log_tail
from modelyard.api.fallbacks import SERVED_BY_HEADER, fallback_for
from modelyard.api.guards import CORS_ORIGIN_KEY, canonical_of
from modelyard.api.liveness import first_byte_guard, lost_after_refusal
from modelyard.api.loading import LoadingStream, wants_loading_content
from modelyard.api.model_routes import (
    MULTIPART_ROUTES,
    check_route,
    multipart_model,
    route_label,
    with_model_field,
)
from modelyard.api.request_options import engine_reads_true, read_options
from modelyard.api.turns import after_request, end_turn, shape_body, take_turn
from modelyard.api.worker_desk import admission_of
from modelyard.auth.principal import Principal
from modelyard.gateway import Gateway
from modelyard.lifecycle import EngineHandle
from modelyard.lora.manager import AdapterError
from modelyard.observability.requests import CLIENT_CLOSED_REQUEST
from modelyard.proxy.canonical import engine_path
from modelyard.proxy.forward import (
    EngineLost,
    EngineUnreachable,
    FirstByteTimeout,
    ProxyOutcome,
    UpstreamError,
    UpstreamTimeout,
)
from modelyard.proxy.sse import (
    StreamTransformer,
    model_name_replacements,
    rewrite_model_in_json,
)
from modelyard.proxy.worker_messages import Reading, Relay, Waiting, body_text
from modelyard.scheduler.names import Target, UnknownModel
from modelyard.scheduler.scheduler import EngineFor
from modelyard.scheduler.supervisor import ModelState, ModelUnavailable

GATEWAY_KEY = web.AppKey("gateway", Gateway)
log = logging.getLogger("modelyard.api")


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
    """POST to an engine route (`/v1/chat/completions`, `/tokenize`, `/v1/audio/...`): the
    request's model picks the engine; routes the gateway does not know are a 404."""
    gateway = gateway_of(request)
    path = canonical_of(request).path  # exactly as checked and as forwarded
    check_route(path)
    limits = gateway.config.limits
    upload = path in MULTIPART_ROUTES
    body = await read_body(request, limits, limits.max_upload_bytes if upload else None)
    if upload:
        content_type = request.headers.get("Content-Type", "")
        asked = await multipart_model(body, content_type)
        target = _resolve_listing(request, gateway, asked)
        return await proxy_multipart(request, gateway, target, path, body, content_type, asked)
    require_json_content_type(request)
    payload = parse_json_object(body)
    target = _resolve_listing(request, gateway, model_field(payload))
    return await proxy_json(request, gateway, target, path, payload, body, route_label(path))


async def proxy_multipart(
    request: web.Request,
    gateway: Gateway,
    target: Target,
    path: str,
    body: bytes,
    content_type: str,
    asked: str,
) -> web.StreamResponse:
    """Forward a multipart upload (audio) that named `asked`, its `model` field set to the
    engine's own name."""
    _require(request, gateway, target)
    _require_path(request, gateway, target, path)
    tokens = TokenCount(
        gateway, principal_of(request).name, target.model, read_options(path, None, len(body))
    )
    tokens.reserve()  # 429 before any engine is started for it
    headers: dict[str, str] = {}
    if asked != target.upstream_name:
        body, headers["Content-Type"] = await with_model_field(
            body, content_type, target.upstream_name
        )
    return await _forward(
        request,
        gateway,
        _Forwarding(target, body, lambda: None, None, tokens, headers),
        path,
        route_label(path),
    )


def _resolve_listing(request: web.Request, gateway: Gateway, name: str) -> Target:
    target = resolve_public(gateway, name)
    if target is None:
        raise not_found(name, usable_names(gateway, principal_of(request)))
    _require(request, gateway, target)
    return target


def resolve_public(gateway: Gateway, name: str) -> Target | None:
    """What a name a client sends serves: a model, alias, adapter or served name (the
    scheduler's), or a variant (the same engine under another name with its own params)."""
    try:
        return gateway.scheduler.resolve(name)
    except UnknownModel:
        pass
    for model_name, model in gateway.config.models.items():
        if name in model.variants:
            base = gateway.scheduler.resolve(model_name)
            return replace(base, public_name=name)
    return None


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
    # The route decides the engine "whatever model says" (seed 000); an adapter or a variant
    # of that same model is the one exception, so LoRA fine-tunes and variants work behind a
    # route too.
    if isinstance(asked, str):
        candidate = resolve_public(gateway, asked)  # a variant of this model counts too
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
    # The model's policy first: the reservation reads the max_tokens the engine will get.
    shaped = shape_body(gateway, principal_of(request), target, path, payload)
    # One reading of the body's options, for the decisions and the accounting alike.
    options = read_options(path, payload, len(body))
    usage_added = ask_stream_for_usage(path, payload, supports_running_usage(gateway, target.model))

    def forwarding(chosen: Target) -> _Forwarding:
        # A fallback is a request of its own for the key: reserved (or 429) before its engine
        # is asked; the refused attempt's reservation was settled by its own finish.
        tokens = TokenCount(gateway, key_name, chosen.model, options)
        tokens.reserve()  # 429 before any engine is started for it
        data = body
        if payload.get("model") != chosen.upstream_name or usage_added or shaped.changed:
            payload["model"] = chosen.upstream_name
            data = json.dumps(payload).encode()
        replacements = model_name_replacements(chosen.upstream_name, chosen.public_name)

        # Usage is always read for the token metrics; the usage-only chunk that we asked
        # for on the client's behalf is dropped, so the client sees the stream it asked for.
        def reading() -> Reading:
            # Built only when asked for (a stream, a proxy worker's relay): a JSON answer
            # relayed here needs none. From values this function computed and typed, never
            # from client input, so pydantic's validation is skipped; the message is still
            # validated where it crosses to a proxy worker (proxy.worker_messages).
            return Reading.model_construct(
                transform=True,
                replacements=[(old.decode(), new.decode()) for old, new in replacements],
                drop_usage_only_chunk=usage_added.final,
                strip_progress_usage=usage_added.running,
                prompt_estimate=options.prompt_estimate,
            )

        def transformer() -> StreamTransformer | None:
            return reading().transformer(tokens.served, tokens.count)

        def rewrite(data: bytes) -> bytes:
            return rewrite_model_in_json(data, replacements)

        return _Forwarding(
            chosen, data, transformer, rewrite if replacements else None, tokens, reading=reading
        )

    try:
        return await _forward(
            request,
            gateway,
            forwarding(target),
            path,
            route_label,
            streamed=engine_reads_true(payload.get("stream")),
            retarget=forwarding,
        )
    finally:
        after_request(gateway, target.model, shaped.keep_alive)


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
    reading = _UNCHANGED
    if isinstance(payload, dict) and engine_reads_true(payload.get("stream")):
        streamed = True
        usage_added = ask_stream_for_usage(
            bare_path, payload, supports_running_usage(gateway, target.model)
        )
        if usage_added:
            body = json.dumps(payload).encode()
        # Built from values this function computed and typed, never from client input:
        # pydantic's validation (about 10 µs) is skipped on the hot path. The message is
        # still validated where it crosses to a proxy worker (proxy.worker_messages).
        reading = Reading.model_construct(
            transform=True,
            drop_usage_only_chunk=usage_added.final,
            strip_progress_usage=usage_added.running,
            prompt_estimate=tokens.served.prompt_estimate,
        )

    def transformer() -> StreamTransformer | None:
        return reading.transformer(tokens.served, tokens.count)

    return await _forward(
        request,
        gateway,
        _Forwarding(target, body or None, transformer, None, tokens, reading=lambda: reading),
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


# A request forwarded as it came: read back unchanged. Frozen, so one serves them all.
_UNCHANGED = Reading()


@dataclass
class _Forwarding:
    """What goes to one engine for one request: the body naming its model, and how its
    answer is read back (stream transformer, body rewrite, token count)."""

    target: Target
    body: bytes | None
    transformer: Any
    rewrite: Any
    tokens: TokenCount
    extra_headers: dict[str, str] | None = None  # e.g. a rewritten upload's Content-Type
    # The same reading as data, for a proxy worker that relays the answer (proxy.worker_messages):
    # made when asked for, since an answer relayed here needs none.
    reading: Callable[[], Reading] = Reading


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
        try:
            return await _forward_once(
                request,
                gateway,
                first,
                path,
                route_label,
                streamed,
                loading,
                may_resend=retarget is not None,  # a second try needs its own accounting
            )
        except _SendAgain as again:
            assert retarget is not None
            # Its engine was lost before it saw the request: once more, on the engine the
            # model has now (a fresh start, or another replica), as a request of its own for
            # the key (the first try's reservation was settled by its own finish).
            gateway.events.emit("resent", first.target.model, again.reason)
            return await _forward_once(
                request,
                gateway,
                retarget(first.target),
                path,
                route_label,
                streamed,
                loading,
            )
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
    body: bytes | None = None,
) -> tuple[EngineHandle, EngineFor]:
    """The ready engine, and its hold (whose `lost` signal ends the request if the engine is
    lost). A fair turn comes first (a model at its max_in_flight): a request waiting its turn
    does not hold the engine, nor start one. A streamed request that must wait for a start or
    wake waits with its headers sent and loading comments flowing (api/loading.py)."""
    principal = principal_of(request)
    turn = await take_turn(gateway, principal, target.model)
    stack.callback(end_turn, gateway, turn)
    affinity = None
    if gateway.scheduler.model_config(target.model).replicas.max > 1:
        affinity = affinity_key(request.headers, body)  # which engine has its prefix cached
    context = gateway.scheduler.engine_for(
        target.model, principal.name, affinity=affinity, adapter=target.adapter
    )
    if not streamed or gateway.scheduler.state_of(target.model) is ModelState.READY:
        return await stack.enter_async_context(context), context
    model = gateway.scheduler.model_config(target.model)
    content = wants_loading_content(request, model.loading_content)
    chat = request.path.endswith("/chat/completions")
    admission = admission_of(request)
    if admission is not None:  # a proxy worker's client: the worker keeps it informed

        def progress() -> str | None:
            view = gateway.scheduler.start_progress(target.model)
            return view.describe() if view is not None else None

        waiting = Waiting(
            model=target.public_name,
            content=content,
            chat=chat,
            progress=progress(),
            cors_origin=request.get(CORS_ORIGIN_KEY),
        )
        entering = asyncio.ensure_future(stack.enter_async_context(context))
        return await admission.wait_for_engine(waiting, progress, entering), context
    stream = LoadingStream(
        request,
        target.public_name,
        lambda: gateway.scheduler.start_progress(target.model),
        content=content,
        chat=chat,
    )
    if loading.stream is not None:
        stream.response = loading.stream.response  # a fallback's wait: the same stream goes on
    loading.stream = stream
    engine = await stream.hold(asyncio.ensure_future(stack.enter_async_context(context)))
    return engine, context


async def _forward_once(
    request: web.Request,
    gateway: Gateway,
    forwarding: _Forwarding,
    path: str,
    route_label: str,
    streamed_request: bool,
    loading: _Loading,
    served_by: str | None = None,
    may_resend: bool = False,
) -> web.StreamResponse:
    """One try. With `may_resend`, a request its engine refused before seeing it, the engine
    then confirmed gone, raises `_SendAgain` (the caller tries once more); otherwise it is
    refused with `Retry-After`."""
    target, body, tokens = forwarding.target, forwarding.body, forwarding.tokens
    started = time.perf_counter()
    status = 500
    first_byte: float | None = None
    streamed = False
    client_gone = False
    usage: dict[str, int] = {}
    outcome = ProxyOutcome()
    engine: EngineHandle | None = None
    engine_key = target.model  # the held engine's: the model's, or a replica's
    served_unknown = False
    try:
        if target.adapter is not None:
            gateway.lora_manager().check(target)  # a bad adapter never starts the engine
        async with contextlib.AsyncExitStack() as stack:
            engine, held = await _engine_for(
                request, gateway, target, stack, streamed_request, loading, body
            )
            engine_key = held.engine_key
            if target.adapter is not None:  # the adapter stays loaded while it serves
                await stack.enter_async_context(gateway.lora_manager().use(target, engine))
            # Built from the canonical form: the engine decodes exactly the path that was
            # checked, and gets the query as the client encoded it.
            query = canonical_of(request).query
            url = URL(
                engine.base_url + engine_path(path) + (f"?{query}" if query else ""),
                encoded=True,
            )
            extra = forwarding.extra_headers
            headers = {**extra, **engine.upstream_headers} if extra else engine.upstream_headers
            guard = first_byte_guard(gateway, target.model, engine_key, engine)
            admission = admission_of(request)
            if admission is not None:  # a proxy worker relays it: same hold, same finish
                relay = Relay(
                    url=str(url),
                    headers=headers,
                    body=body_text(body),
                    reading=forwarding.reading(),
                    answer_headers={SERVED_BY_HEADER: served_by} if served_by else {},
                    cors_origin=request.get(CORS_ORIGIN_KEY),
                    first_byte_timeout=guard.timeout,
                )
                # The worker bounds the engine's silences; the verdict is this process's.
                outcome = await admission.relay(relay, held.lost, guard.check)
                assert admission.response is not None
                response = admission.response
            else:
                response, outcome = await gateway.upstream.forward(
                    request,
                    url,
                    body,
                    forwarding.transformer,
                    forwarding.rewrite,
                    outcome,
                    headers,
                    lost=held.lost,  # a lost engine ends its requests at once
                    prepared=loading.stream.response if loading.stream else None,
                    answer_headers={SERVED_BY_HEADER: served_by} if served_by else None,
                    first_byte=guard,
                )
            status, first_byte, streamed = outcome.status, outcome.first_byte_s, outcome.streamed
            if outcome.first_byte_timed_out:
                status = 504  # a 200 header, then an error event: counted as a timeout
            elif outcome.upstream_broke or outcome.engine_lost:
                status = 502  # the client got a 200 header, then an error event
            elif outcome.client_gone:
                client_gone = True
                status = outcome.status or CLIENT_CLOSED_REQUEST
            usage = outcome.usage or usage_of(outcome.body)
            return response
    except ApiError as error:  # a full fair queue's 503: recorded with its own status
        status = error.status
        raise
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
        admission = admission_of(request)
        if admission is not None and admission.worker_lost:
            # The proxy worker that relayed it died: lost by the gateway, not the client;
            # what it served is not known, so its whole reservation is charged.
            client_gone, served_unknown, status = False, True, 502
            log.error(
                "proxy worker %s was lost with a request for %s in flight: logged as 502",
                admission.worker,
                target.model,
            )
        raise
    except EngineLost as lost:
        status = 503
        raise _engine_lost(request, gateway, target.model, str(lost)) from None
    except EngineUnreachable as error:
        status = 503
        if gateway.scheduler.is_remote(target.model):
            await _forget_remote(request, gateway, target.model, error)
        assert engine is not None
        # With replicas, requests go to the model's other ready engines while this one's
        # checks reach their verdict (a dead node refuses before its loss is declared).
        limits = gateway.config.limits
        elsewhere = gateway.scheduler.avoid_replica(
            target.model, engine_key, limits.health_check_interval * limits.health_check_failures
        )
        if await lost_after_refusal(gateway, engine_key, engine):
            if error.refused and may_resend:
                raise _SendAgain(f"its engine was lost before it saw a request ({error})") from None
            raise _engine_lost(request, gateway, target.model, str(error)) from None
        if elsewhere and error.refused and may_resend:
            raise _SendAgain(
                f"its engine refused the connection; another of its engines serves ({error})"
            ) from None
        # Alive, as far as one check tells: the client comes back in a moment, never a bare
        # 502 for a request that no engine answered.
        raise ApiError(
            503,
            f"model {target.model!r}: its engine "
            f"{'refused' if error.refused else 'dropped'} the connection ({error}); retry",
            "engine_unreachable",
            retry_after=1.0,
        ) from None
    except UpstreamError as error:
        # 504 for an engine that sent nothing in time (the watchdog counts these as signs of
        # a hung engine), 502 for one that could not be reached or broke off.
        timed_out = isinstance(error, UpstreamTimeout)
        status = 504 if timed_out else 502
        if not timed_out and gateway.scheduler.is_remote(target.model):
            status = 503
            await _forget_remote(request, gateway, target.model, error)
        await gateway.scheduler.notice_exit(target.model, timeout=1.0)
        if not timed_out and engine is not None and engine.exited.done():
            # Its socket broke before its exit was reported: the same loss, the same answer.
            status = 503
            raise _engine_lost(request, gateway, target.model, "its engine exited") from None
        failure = gateway.scheduler.failure_of(target.model)
        tail = failure.log_tail if failure else []
        code = "upstream_timeout" if timed_out else "upstream_error"
        if isinstance(error, FirstByteTimeout):
            code = "upstream_first_byte_timeout"
        raise ApiError(
            status,
            with_log_tail(f"model {target.model!r}: {error}", tail, principal_of(request).admin),
            code,
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
            served_unknown=served_unknown,
        )


class _SendAgain(Exception):
    """The request's engine was lost before it saw the request: it may be sent once more."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _forget_remote(
    request: web.Request, gateway: Gateway, model: str, error: UpstreamError
) -> NoReturn:
    """A remote engine unreachable while serving. Not ours to restart: forget the connection
    (the next request, or the gateway's own check, connects again); the client comes back."""
    await gateway.scheduler.forget_remote(model, f"unreachable while serving: {error}")
    raise ApiError(
        503,
        with_log_tail(
            f"model {model!r}: the remote engine is not answering ({error}); retry later",
            [],
            principal_of(request).admin,
        ),
        "remote_unavailable",
        retry_after=5.0,
    ) from None


def _engine_lost(request: web.Request, gateway: Gateway, model: str, why: str) -> ApiError:
    """A request whose engine was lost before anything of the answer reached the client: a
    503 with Retry-After (OpenAI's SDKs retry such an answer on their own), and the next
    request starts a fresh engine, or is told when it may."""
    if gateway.scheduler.closing:
        return ApiError(
            503,
            f"model {model!r}: the gateway is shutting down and stopped its engine",
            "shutting_down",
            retry_after=5.0,
        )
    failure = gateway.scheduler.failure_of(model)
    return ApiError(
        503,
        with_log_tail(
            f"model {model!r}: the engine serving this request was lost ({why}); retry",
            failure.log_tail if failure is not None else [],
            principal_of(request).admin,
        ),
        "engine_lost",
        retry_after=gateway.scheduler.retry_after_loss(model),
    )


def model_listing(
    gateway: Gateway,
    only: str | None = None,
    principal: Principal | None = None,
    include_unlisted: bool = False,
) -> dict[str, Any]:
    """GET /v1/models: every configured name the key may use, answered at once (never waits
    for an engine). OpenAI's fields first, then the gateway's own (`model_card`)."""
    scheduler = gateway.scheduler
    created = int(gateway.started_at)
    names: list[tuple[str, str | None]] = [(public, None) for public in scheduler.public_names()]
    names += [
        (variant, model)
        for model, config in gateway.config.models.items()
        for variant in config.variants
    ]
    data = []
    for public, variant_of in sorted(names):
        target = resolve_public(gateway, public)
        if target is None:
            continue
        if only is not None and target.model != only:
            continue
        if principal is not None and not may_use(principal, target):
            continue
        if target.adapter is not None and not gateway.adapter_servable(target.adapter):
            continue  # refused adapters answer requests with their problem, but are not listed
        config = gateway.config.models[target.model]
        if config.unlisted and not include_unlisted:
            continue
        entry: dict[str, Any] = {
            "id": public,
            "object": "model",
            "created": created,
            "owned_by": "modelyard",
            "root": target.model,
            "parent": target.model if target.adapter else None,
            **model_card(gateway, target.model),
        }
        if variant_of is not None:
            entry["variant_of"] = variant_of
        elif public != target.model and target.adapter is None:
            entry["alias_of"] = target.model
        data.append(entry)
    return {"object": "list", "data": data}


def model_card(gateway: Gateway, model: str) -> dict[str, Any]:
    """The gateway's fields of a model's listing: names, context length, what it can do and
    whether its engine runs now."""
    config = gateway.config.models[model]
    context = config.context_length or config.max_model_len
    if context is None and config.engine == "vllm":
        context = gateway.config.defaults.max_model_len
    if context is None:
        context = engine_context_length(gateway, model)
    card: dict[str, Any] = {
        "display_name": config.display_name or model,
        "description": config.description,
        "context_length": context,
        "capabilities": list(config.capabilities or default_capabilities(config.engine)),
        "state": gateway.scheduler.state_of(model).value,
    }
    if config.unlisted:
        card["unlisted"] = True
    return card


def default_capabilities(engine: str) -> tuple[str, ...]:
    # What the engine kind serves without knowing the weights: vLLM and OpenAI-compatible
    # servers serve completions; the built-in diffusion server makes images.
    return ("image",) if engine == "diffusion" else ("chat", "completion")


async def list_models(request: web.Request) -> web.Response:
    listing = model_listing(gateway_of(request), principal=principal_of(request))
    return web.json_response(listing)


async def get_model(request: web.Request) -> web.Response:
    gateway = gateway_of(request)
    name = request.match_info["name"]
    target = _resolve_listing(request, gateway, name)
    listing = model_listing(gateway, include_unlisted=True)["data"]
    for entry in listing:
        if entry["id"] == name:
            return web.json_response(entry)
    for entry in listing:
        if entry["id"] == target.model:  # a served name: accepted, though not listed
            return web.json_response({**entry, "id": name, "alias_of": target.model})
    raise ApiError(404, f"model {name!r} does not exist", "model_not_found")
