"""When a model is refused, the first of its `fallbacks` that can serve now answers instead.

Refused means what no retry soon would fix for this request: it can never fit or cannot fit
now, its start timed out or failed, it is in a crash loop, its remote server is down. A
fallback "can serve now" when it is ready, or would start without evicting anything; with
`fallback_may_evict: true` it may also start the way any request starts it. A fallback's own
fallbacks are not followed (one hop: no loops, no surprises).
"""

from __future__ import annotations

from modelyard.api.access import may_use
from modelyard.auth.principal import Principal
from modelyard.gateway import Gateway
from modelyard.placement.policy import CannotFit, plan_placement
from modelyard.scheduler.names import Target, UnknownModel
from modelyard.scheduler.supervisor import ModelState

# The refusals a fallback answers (ModelUnavailable codes, and the remote 503 of serving).
FALLBACK_REFUSALS = frozenset(
    {
        "model_cannot_fit",
        "insufficient_gpu_memory",
        "waiting_for_gpu",
        "start_timeout",
        "engine_start_failed",
        "engine_crash_loop",
        "remote_unavailable",
    }
)
SERVED_BY_HEADER = "X-Modelyard-Served-By"


def fallback_for(
    gateway: Gateway, principal: Principal, target: Target, refusal: str | None
) -> Target | None:
    """The fallback that serves `target`'s request after `refusal`, or None."""
    if refusal not in FALLBACK_REFUSALS or target.adapter is not None:
        return None
    scheduler = gateway.scheduler
    model = scheduler.model_config(target.model)
    for name in model.fallbacks:
        try:
            candidate = scheduler.resolve(name)
        except UnknownModel:  # removed by a reload since: skip it
            continue
        if not may_use(principal, candidate):
            continue  # a fallback is no way around a key's model list
        if _can_serve_now(gateway, name, model.fallback_may_evict):
            return candidate
    return None


def _can_serve_now(gateway: Gateway, name: str, may_evict: bool) -> bool:
    scheduler = gateway.scheduler
    state = scheduler.state_of(name)
    if state is ModelState.READY:
        return True
    if scheduler.in_backoff(name):
        return False  # in its own crash back-off: it would be refused too
    if may_evict:
        return True
    if state in (ModelState.STARTING, ModelState.WAKING):
        return True  # already coming: waiting for it evicts nothing more
    return _fits_without_eviction(gateway, name)


def _fits_without_eviction(gateway: Gateway, name: str) -> bool:
    """Would a start of `name` now take only free memory (no sleep, stop or wait first)?"""
    placement = gateway.placement
    if placement is None:
        # No GPU management (CPU engines): a start evicts nothing, except a member of an
        # exclusive group whose other member runs.
        return not gateway.scheduler.exclusive_peer_running(name)
    supervisor = gateway.scheduler.supervisor(name)
    plan = plan_placement(
        placement.target(supervisor),
        placement.gpu_capacities(),
        placement.engines(name),
        now=gateway.scheduler.now(),
        host_ram_for_sleep=placement.host_ram_left(),
    )
    return not isinstance(plan, CannotFit) and not plan.actions and not plan.wait_for
