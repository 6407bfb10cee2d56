"""Engine kinds: *what* runs for a model (argv, env, health, capabilities)."""

from __future__ import annotations

from modelyard.config.schema import EngineKindName
from modelyard.engines.base import Capabilities, EngineKind, LaunchSpec, MemoryBudget, served_name
from modelyard.engines.command import CommandEngine
from modelyard.engines.diffusion import DiffusionEngine
from modelyard.engines.remote import RemoteEngine
from modelyard.engines.vllm import VllmEngine

ENGINE_KINDS: dict[EngineKindName, EngineKind] = {
    "vllm": VllmEngine(),
    "command": CommandEngine(),
    "diffusion": DiffusionEngine(),
    "remote": RemoteEngine(),
}


def engine_kind(name: EngineKindName) -> EngineKind:
    return ENGINE_KINDS[name]


__all__ = [
    "ENGINE_KINDS",
    "Capabilities",
    "EngineKind",
    "LaunchSpec",
    "MemoryBudget",
    "engine_kind",
    "served_name",
]
