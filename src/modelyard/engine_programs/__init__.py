"""Programs that run in the engine's Python, not in the gateway's.

Each file here is a script started by path with another interpreter (the demo's engine venv,
or whatever Python has torch, diffusers or vLLM): the diffusion server, the demo's model and
adapter builders, and the `vllm` launcher the demo installs. The gateway never imports them
(they may import torch); it only locates them (`program_path`). They live in the package so
that an installed modelyard ships them.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def program_path(name: str) -> Path:
    """The path of one program here, e.g. `program_path("diffusion_server.py")`."""
    return HERE / name
