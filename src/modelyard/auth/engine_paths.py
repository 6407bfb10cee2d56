"""Engine endpoints that change the engine itself: only an admin key may reach them.

The gateway owns each engine's state (sleeping, loaded adapters); a user who could call vLLM's
`/sleep` or `/v1/load_lora_adapter` through a seed route or `/upstream/` would put that state out
of step, abort other users' requests, or load an adapter from any path on the server.
"""

from __future__ import annotations

import posixpath
import re

_CONTROL_PATHS = frozenset(
    {
        "sleep",
        "wake_up",
        "collective_rpc",
        "reset_prefix_cache",
        "reset_mm_cache",
        "start_profile",
        "stop_profile",
        "scale_elastic_ep",
        "pause",
        "resume",
        "update_weights",
        "init_weight_transfer",
        "v1/load_lora_adapter",
        "v1/unload_lora_adapter",
        "abort_requests",
        "server_info",  # the engine's whole configuration, secrets in its args included
        "reset_encoder_cache",
        "rlhf",
    }
)
_SLASHES = re.compile(r"/+")


def normalized(path: str) -> str:
    """`path` as the engine will see it: '..', '.' and repeated slashes resolved, no leading /."""
    collapsed = _SLASHES.sub("/", "/" + path)
    return posixpath.normpath(collapsed).lstrip("/")


def is_engine_control(path: str) -> bool:
    """Whether `path` (relative to the engine's root) is one of the engine's control endpoints.

    The gateway checks the canonical path (`proxy.canonical`), which has nothing left to
    resolve; normalising again here is a second line, not the first."""
    clean = normalized(path.split("?", 1)[0]).lower()
    return any(clean == control or clean.startswith(control + "/") for control in _CONTROL_PATHS)
