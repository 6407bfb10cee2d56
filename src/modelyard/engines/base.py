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
    # Sent with every request to the engine (readiness, health checks, proxying): the key an
    # engine started with `--api-key` wants. Never logged.
    upstream_headers: dict[str, str] = field(default_factory=dict)
    # Set for an engine that runs elsewhere (`engine: remote`): nothing is started.
    remote_url: str | None = None
    # The name of the engine's log file (`<name>.log` under the state folder's logs): a
    # replica's key (`coder#2`); None: the model's name.
    log_name: str | None = None


class EngineKind(Protocol):
    """One kind of engine (vllm, command, diffusion)."""

    def problems(self, name: str, model: ModelConfig, gateway: GatewayConfig) -> list[str]:
        """Config problems that pydantic cannot see, as `key.path: message` strings."""

    def warnings(self, name: str, model: ModelConfig, gateway: GatewayConfig) -> list[str]:
        """Settings that are valid but probably wrong (printed by `check` and `serve`)."""

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


def bearer_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def engine_env(model: ModelConfig, gateway: GatewayConfig) -> dict[str, str]:
    """`defaults.env` under the model's own `env` (the model's value wins)."""
    return {**gateway.defaults.env, **model.env}


def gpu_env(budget: MemoryBudget | None) -> dict[str, str]:
    """Pin an engine to the GPUs placement chose for it."""
    if budget is None or not budget.gpu_indexes:
        return {}
    # NVML numbers GPUs in PCI bus order, CUDA by default "fastest first": make them agree.
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in budget.gpu_indexes),
    }


def flag_name(arg: str) -> str:
    """`--flag` of `--flag` or `--flag=value`."""
    return arg.split("=", 1)[0]


def owned_flag_problems(name: str, args: list[str], owned: dict[str, str]) -> list[str]:
    """Flags in a model's `args` that the gateway sets itself, each with what to do instead."""
    return [
        f"models.{name}.args.{index}: {flag_name(arg)} is set by the gateway; "
        f"{owned[flag_name(arg)]}"
        for index, arg in enumerate(args)
        if flag_name(arg) in owned
    ]


def gpu_share(budget: MemoryBudget | None, digits: int) -> str | None:
    """The planned share of one GPU, rounded down (the engine must never take more than
    planned), at least 0.01; None without a budget."""
    if budget is None or budget.gpu_total_bytes <= 0 or budget.bytes_per_gpu <= 0:
        return None
    scale = 10**digits
    fraction = int(budget.bytes_per_gpu / budget.gpu_total_bytes * scale) / scale
    return f"{min(max(fraction, 0.01), 1.0):.{digits}f}"
