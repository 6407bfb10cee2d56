"""Where the demo keeps what it builds: the engine venv, model folders and LoRA adapters.

Everything lives under one folder, `$MODELYARD_HOME` (default `~/.cache/modelyard`), so removing
that folder removes the demo completely. Nothing here touches the disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "MODELYARD_HOME"
"""Environment variable naming the demo's home folder."""

DEFAULT_HOME = Path("~/.cache/modelyard")

CHAT_MODEL = "smollm2-135m-instruct"
"""Folder name (under `models/`) of the SmolLM2-135M-Instruct safetensors build."""

CODER_MODEL = "gemma3-270m"
"""Folder name (under `models/`) of the Gemma 3 270M safetensors build."""

DEMO_ADAPTERS = ("sql-adapter", "email-adapter")
"""The demo's LoRA adapters for SmolLM2 (names from the seed 002)."""


def modelyard_home(environ: Mapping[str, str] | None = None) -> Path:
    """The demo's home folder: `$MODELYARD_HOME`, or `~/.cache/modelyard`, made absolute."""
    env = os.environ if environ is None else environ
    raw = env.get(HOME_ENV) or str(DEFAULT_HOME)
    return Path(raw).expanduser().absolute()


@dataclass(frozen=True)
class DemoHome:
    """The paths of one demo home folder."""

    root: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DemoHome:
        """The home named by `$MODELYARD_HOME` (or the default)."""
        return cls(modelyard_home(environ))

    @property
    def engine_venv(self) -> Path:
        """The virtual environment that holds vLLM (and torch, transformers, peft)."""
        return self.root / "engine-venv"

    @property
    def engine_python(self) -> Path:
        """The engine venv's Python interpreter."""
        return self.engine_venv / "bin" / "python"

    @property
    def engine_stamp(self) -> Path:
        """Written last by a finished engine install; names the requirements' hash."""
        return self.engine_venv / ".modelyard-requirements"

    @property
    def vllm_launcher(self) -> Path:
        """The `vllm` command the demo configures (modelyard/engine_programs/vllm_launcher.py)."""
        return self.engine_venv / "bin" / "modelyard-vllm"

    @property
    def models(self) -> Path:
        """Folder of built model weights (one safetensors folder per model)."""
        return self.root / "models"

    @property
    def adapters(self) -> Path:
        """Folder of LoRA adapters (one peft folder per adapter)."""
        return self.root / "adapters"

    @property
    def chat_model(self) -> Path:
        """SmolLM2-135M-Instruct, served as the demo's `chat` model."""
        return self.models / CHAT_MODEL

    @property
    def coder_model(self) -> Path:
        """Gemma 3 270M, served as the demo's `coder` model."""
        return self.models / CODER_MODEL

    @property
    def diffusion_model(self) -> Path:
        """The tiny random Stable-Diffusion-shaped pipeline the demo's `vision` model serves."""
        return self.models / "tiny-diffusion"

    def adapter(self, name: str) -> Path:
        """The folder of one LoRA adapter."""
        return self.adapters / name
