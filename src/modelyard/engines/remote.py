"""An OpenAI-compatible server that something else runs (another host, a container already up).

The gateway never starts or stops it: "starting" checks that it answers, "stopping" forgets it.
Seeds 001 and 003 route to engines like these.
"""

from __future__ import annotations

from modelyard.config.schema import GatewayConfig, ModelConfig
from modelyard.engines.base import Capabilities, LaunchSpec, MemoryBudget, bearer_headers

# Many OpenAI-compatible servers have no /health; every one answers GET /v1/models.
DEFAULT_REMOTE_HEALTH_PATH = "/v1/models"


class RemoteEngine:
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
        assert model.url is not None  # the schema requires it for this kind
        return LaunchSpec(
            argv=[],
            health_path=model.health_path or DEFAULT_REMOTE_HEALTH_PATH,
            capabilities=Capabilities(),
            upstream_headers=bearer_headers(model.api_key),
            remote_url=model.url,
        )
