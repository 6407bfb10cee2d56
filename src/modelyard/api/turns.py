"""The request path's part in sharing engines (`modelyard.sharing`), for `api.serving`:

- `take_turn` / `end_turn`: a slot at a model with `max_in_flight`, taken fairly across keys
  before the engine is held, or a 503 with Retry-After when its queue is full;
- `shape_body`: the model's (and variant's) params, the key's priority for an engine that
  schedules by priority, and the request's `keep_alive` taken out of the body and checked;
- `after_request`: what that keep_alive asks for, once the answer has been sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelyard.api.errors import ApiError
from modelyard.auth.principal import Principal
from modelyard.gateway import Gateway
from modelyard.scheduler.names import Target
from modelyard.sharing.fair_queue import QueueFull, Slot
from modelyard.sharing.keep_alive import BadKeepAlive, capped, parse_keep_alive
from modelyard.sharing.request_policy import (
    apply_policy,
    policy_for,
    schedules_by_priority,
    set_priority,
)


async def take_turn(gateway: Gateway, principal: Principal, model: str) -> Slot:
    """A slot on `model`'s engine for this request (waiting fairly when it is full)."""
    config = gateway.config
    model_config = config.models[model]
    bound = model_config.max_queue
    if bound is None:
        bound = config.limits.max_queue_per_model
    try:
        return await gateway.fair_queues.admit(
            model,
            model_config.max_in_flight,
            principal.name,
            principal.share,
            bound,
            config.limits.max_queue,  # across all models, as for starts
        )
    except QueueFull as error:
        raise ApiError(503, str(error), "queue_full", retry_after=error.retry_after) from None


def end_turn(gateway: Gateway, slot: Slot) -> None:
    gateway.fair_queues.release(slot)


@dataclass(frozen=True)
class Shaped:
    changed: bool  # the body differs from what the client sent
    keep_alive: float | None  # seconds the request asked for (None: it did not ask)


# Routes whose requests generate text: where sampling params and vLLM's `priority` mean
# something (a temperature forced onto `/tokenize` or an embedding would not).
GENERATION_ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}
)


def shape_body(
    gateway: Gateway, principal: Principal, target: Target, path: str, payload: dict[str, Any]
) -> Shaped:
    """Apply the model's request policy to `payload` in place (see `sharing`): keep_alive on
    every route; params and priority on the routes that generate (`GENERATION_ROUTES`)."""
    model = gateway.config.models.get(target.model)
    if model is None:  # removed by a reload while this request was on its way
        return Shaped(False, None)
    keep_alive: float | None = None
    changed = False
    if "keep_alive" in payload:
        asked = payload.pop("keep_alive")
        changed = True
        if asked is not None:
            if not principal.share.keep_alive:
                raise ApiError(
                    403,
                    f"this API key ({principal.name}) may not send keep_alive",
                    "keep_alive_forbidden",
                    "keep_alive",
                )
            try:
                keep_alive = parse_keep_alive(asked)
            except BadKeepAlive as error:
                raise ApiError(400, str(error), "invalid_keep_alive", "keep_alive") from None
    if path.split("?", 1)[0] not in GENERATION_ROUTES:
        return Shaped(changed, keep_alive)
    changed |= apply_policy(payload, policy_for(model, target.public_name))
    if schedules_by_priority(model, gateway.config.defaults):
        changed |= set_priority(payload, principal.share.priority)
    return Shaped(changed, keep_alive)


def after_request(gateway: Gateway, model: str, keep_alive: float | None) -> None:
    """Ollama's meaning: each request sets how long its engine stays after it (a request
    without keep_alive puts the model's own idle timeout back); 0 stops the engine now,
    unless another request is in flight or waiting."""
    config = gateway.config.models.get(model)
    if config is None or gateway.scheduler.is_remote(model):
        return  # a remote engine is not ours to stop
    timeout = None if keep_alive is None else capped(keep_alive, config.max_keep_alive)
    if timeout == 0:
        gateway.scheduler.keep_alive(model, None)
        if gateway.fair_queues.in_flight(model) or gateway.fair_queues.waiting(model):
            return
        gateway.in_background(_stop_if_idle(gateway, model))
        return
    gateway.scheduler.keep_alive(model, timeout)


async def _stop_if_idle(gateway: Gateway, model: str) -> None:
    await gateway.scheduler.stop_if_idle(model, "keep_alive 0: stopped after its request")
