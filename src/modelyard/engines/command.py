"""Any OpenAI-compatible server started from an argv with `{port}` (like llama-swap's `cmd`)
and optionally `{host}`."""

from __future__ import annotations

from modelyard.config.schema import GatewayConfig, ModelConfig
from modelyard.engines.base import (
    Capabilities,
    LaunchSpec,
    MemoryBudget,
    bearer_headers,
    engine_env,
    gpu_env,
)


class CommandEngine:
    def problems(self, name: str, model: ModelConfig, gateway: GatewayConfig) -> list[str]:
        return []

    def warnings(self, name: str, model: ModelConfig, gateway: GatewayConfig) -> list[str]:
        return []

    def launch_spec(
        self,
        name: str,
        model: ModelConfig,
        gateway: GatewayConfig,
        port: int,
        budget: MemoryBudget | None,
    ) -> LaunchSpec:
        assert model.command is not None  # the schema requires it for this kind
        # {host}: 127.0.0.1 here; on a Ray cluster the runtime binds the node's address.
        argv = [
            part.replace("{port}", str(port)).replace("{host}", "127.0.0.1")
            for part in model.command
        ] + list(model.args)
        return LaunchSpec(
            argv=argv,
            env={**gpu_env(budget), **engine_env(model, gateway)},
            health_path=model.health_path or "/health",
            capabilities=Capabilities(),
            upstream_headers=bearer_headers(model.engine_api_key),
        )
