"""Where a start downloads its weights, and how much of them has arrived (for progress)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def hub_cache_dir(environ: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache as `huggingface_hub` picks it: HF_HUB_CACHE, HF_HOME/hub,
    or ~/.cache/huggingface/hub."""
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    return Path(environ.get("HOME", "~")).expanduser() / ".cache" / "huggingface" / "hub"


def download_folder(model: str | None, environ: Mapping[str, str]) -> Path | None:
    """The cache folder a hub name `org/name` downloads into; None for a local path."""
    if model is None or model.count("/") != 1 or model.startswith(("/", ".", "~")):
        return None
    return hub_cache_dir(environ) / ("models--" + model.replace("/", "--"))


def folder_bytes(folder: Path) -> int:
    """Bytes under `folder`, partial downloads (`*.incomplete`) included; 0 when absent."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size  # blobs once, not their symlinks
            except OSError:
                continue
    return total
