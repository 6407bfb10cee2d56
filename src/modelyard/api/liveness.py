"""What a request does when its engine seems gone: a frozen engine (no first byte in time)
or one that refuses the connection gets a liveness check now, not at the next interval.

Engines are named by their key (the model's, or a replica's: `coder#2`), as the watchdog
checks them."""

from __future__ import annotations

import asyncio
import contextlib

from modelyard.gateway import Gateway
from modelyard.lifecycle import EngineHandle
from modelyard.proxy.forward import FirstByteGuard

# How long a request waits for a dying engine's exit to be reported after its connection
# was refused (the kernel closes a killed process's sockets before it is reaped).
EXIT_NOTICE_S = 0.2


def first_byte_guard(
    gateway: Gateway, model: str, key: str, engine: EngineHandle
) -> FirstByteGuard:
    """The bound on the wait for `engine`'s first byte, with its liveness check (without a
    watchdog, which every served gateway has, nothing is checked and nothing cut)."""
    watchdog = gateway.watchdog

    async def check() -> bool:
        return watchdog is None or await watchdog.check_now(key, engine)

    config = gateway.config.models.get(model)  # gone if a reload removed it meanwhile
    own = config.first_byte_timeout if config is not None else None
    return FirstByteGuard(own or gateway.config.limits.upstream_first_byte_timeout, check)


async def lost_after_refusal(gateway: Gateway, key: str, engine: EngineHandle) -> bool:
    """The engine refused a connection (or dropped it before answering): whether it is gone
    for sure, its exit reported or its loss declared. It is checked now either way, and a
    check that fails counts toward declaring it hung."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(engine.exited), EXIT_NOTICE_S)
    await asyncio.sleep(0)  # the exit's callbacks (the model's failure) run first
    if engine.exited.done():
        return True
    if gateway.watchdog is not None:
        await gateway.watchdog.check_now(key, engine)
    try:
        return engine.exited.done() or gateway.scheduler.engine_of(key) is not engine
    except KeyError:
        return True  # its slot is gone (a reload, a scale-down): so is the engine
