"""Engine endpoints that change the engine itself: only an admin key may reach them.

The gateway owns each engine's state (sleeping, loaded adapters); a user who could call vLLM's
`/sleep` or `/v1/load_lora_adapter` through a seed route or `/upstream/` would put that state out
of step, abort other users' requests, or load an adapter from any path on the server.
"""

from __future__ import annotations

import functools
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


_CONTROL_PREFIXES = tuple(control + "/" for control in _CONTROL_PATHS)


@functools.lru_cache(maxsize=1024)  # asked on every proxied request: paths repeat, so once
def is_engine_control(path: str) -> bool:
    """Whether `path` (relative to the engine's root) is one of the engine's control endpoints.

    The gateway checks the canonical path (`proxy.canonical`), which has nothing left to
    resolve; normalising again here is a second line, not the first."""
    clean = normalized(path.split("?", 1)[0]).lower()
    return clean in _CONTROL_PATHS or clean.startswith(_CONTROL_PREFIXES)


# What `/upstream/` and seed routes may reach on a remote engine by default: OpenAI's routes.
# A remote may be another gateway or a service whose other paths are its admin API, reached
# with the key the config gives for it (issue 23); `upstream_paths:` opens more.
OPENAI_PATHS = (
    "v1/chat/completions",
    "v1/completions",
    "v1/embeddings",
    "v1/responses",
    "v1/models",
    "v1/audio",
    "v1/images",
    "v1/moderations",
)


def remote_path_allowed(path: str, extra: tuple[str, ...] | list[str] = ()) -> bool:
    """Whether `path` is one of OpenAI's routes or of `extra` (`/v1/rerank`), or below one."""
    clean = normalized(path.split("?", 1)[0])
    for allowed in (*OPENAI_PATHS, *(normalized(more) for more in extra)):
        if clean == allowed or clean.startswith(allowed + "/"):
            return True
    return False
