"""How much GPU memory to plan for an engine before (or without) measuring it.

In order of trust (issue 4): a measured footprint, the config's `memory` hint, the weights'
size on disk times a safety factor plus overhead, and last the whole GPU. Ollama estimates
too, and its users' top complaint is estimates that were too low (OOM); so the disk estimate
errs high, and the first start measures the real number for next time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modelyard.placement.footprints import GIB, Footprint

Source = Literal["measured", "hint", "disk", "whole_gpu"]

# Weights are the bulk of an engine; the rest is the CUDA context (about 0.5 GiB), activations,
# CUDA graphs and at least some KV cache. Both numbers err high on purpose.
DEFAULT_SAFETY_FACTOR = 1.2
DEFAULT_OVERHEAD_BYTES = 2 * GIB

# When a folder holds several formats of the same weights (Llama repos ship safetensors and an
# `original/` folder of .pth), engines load one: count the first format present.
_WEIGHT_FORMATS = ((".safetensors",), (".bin", ".pt", ".pth"))


@dataclass(frozen=True)
class Estimate:
    bytes_per_gpu: int | None  # None: the whole GPU (the policy's `Target.bytes_per_gpu`)
    source: Source


def estimate_bytes(
    *,
    footprint: Footprint | None,
    hint_bytes: int | None,
    model: str | None,
    tensor_parallel: int = 1,
    safety_factor: float = DEFAULT_SAFETY_FACTOR,
    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
    environ: Mapping[str, str] | None = None,
    disk_bytes: int | None = None,
) -> Estimate:
    """Bytes per GPU to plan for: measured > `memory:` hint (per GPU) > disk size > whole GPU.

    `model` is the weights path or a Hugging Face name (looked up in the local hub cache);
    `disk_bytes`, when given, is its size already read (off the event loop) and nothing is walked.
    """
    if footprint is not None and footprint.awake_bytes_per_gpu is not None:
        return Estimate(footprint.awake_bytes_per_gpu, "measured")
    if hint_bytes is not None:
        return Estimate(hint_bytes, "hint")
    weights = disk_bytes
    if weights is None and model:
        weights = weights_bytes(model, environ)
    if weights:
        per_gpu = weights / max(tensor_parallel, 1) * safety_factor + overhead_bytes
        return Estimate(int(per_gpu), "disk")
    return Estimate(None, "whole_gpu")


def weights_bytes(model: str, environ: Mapping[str, str] | None = None) -> int | None:
    """Size of a model's weights on disk: a file, a folder, or a name in the hub cache."""
    path = Path(model).expanduser()
    if not path.exists():
        found = hub_snapshot(model, os.environ if environ is None else environ)
        if found is None:
            return None
        path = found
    if path.is_file():
        return path.stat().st_size
    sizes: dict[str, list[int]] = {}
    seen: set[tuple[int, int]] = set()
    for root, _, files in os.walk(path):
        for name in files:
            try:
                info = (Path(root) / name).stat()  # follows the hub cache's symlinks to blobs
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            sizes.setdefault(Path(name).suffix.lower(), []).append(info.st_size)
    for suffixes in _WEIGHT_FORMATS:
        total = sum(size for suffix in suffixes for size in sizes.get(suffix, []))
        if total:
            return total
    # A folder of GGUF files holds one model in several quantizations: the largest is the
    # one that could be served.
    if sizes.get(".gguf"):
        return max(sizes[".gguf"])
    total = sum(size for group in sizes.values() for size in group)
    return total or None


def hub_snapshot(model: str, environ: Mapping[str, str]) -> Path | None:
    """The local snapshot of a Hugging Face repo `org/name`, as the hub cache lays it out."""
    if model.count("/") != 1:
        return None
    if "HF_HUB_CACHE" in environ:
        hub = Path(environ["HF_HUB_CACHE"])
    elif "HF_HOME" in environ:
        hub = Path(environ["HF_HOME"]) / "hub"
    else:
        hub = Path(environ.get("HOME", "~")).expanduser() / ".cache" / "huggingface" / "hub"
    repo = hub / ("models--" + model.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None
