"""What an engine kind must provide: argv, env and readiness for one model. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from modelyard.config.schema import GatewayConfig, ModelConfig


@dataclass(frozen=True)
class MemoryBudget:
    """GPU memory the gateway planned for an engine, decided by placement."""

    gpu_indexes: tuple[int, ...]
    bytes_per_gpu: int
    gpu_total_bytes: int


@dataclass(frozen=True)
class Capabilities:
    sleep_level: int = 0  # 0: cannot sleep; 1 or 2: vLLM sleep levels
    lora: bool = False


@dataclass(frozen=True)
class LaunchSpec:
    """Everything the runtime needs to run one engine process."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    # When set, readiness also needs this name in the engine's GET /v1/models.
    expect_served_name: str | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)


class EngineKind(Protocol):
    """One kind of engine (vllm, command, diffusion)."""

    def problems(self, name: str, model: ModelConfig, gateway: GatewayConfig) -> list[str]:
        """Config problems that pydantic cannot see, as `key.path: message` strings."""

    def launch_spec(
        self,
        name: str,
        model: ModelConfig,
        gateway: GatewayConfig,
        port: int,
        budget: MemoryBudget | None,
    ) -> LaunchSpec:
        """The argv and env that start this model's engine on `port`."""


def served_name(name: str, model: ModelConfig) -> str:
    return model.served_name or name


def gpu_env(budget: MemoryBudget | None) -> dict[str, str]:
    """Pin an engine to the GPUs placement chose for it."""
    if budget is None or not budget.gpu_indexes:
        return {}
    # NVML numbers GPUs in PCI bus order, CUDA by default "fastest first": make them agree.
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in budget.gpu_indexes),
    }
