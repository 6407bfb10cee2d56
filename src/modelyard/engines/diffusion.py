"""The built-in image server (`diffusion_server.py`), run by a Python that has diffusers and torch.

The gateway never imports the server: it runs the file by path with `diffusion.executable` (the
engine venv's Python), so torch and diffusers stay out of the gateway's venv.
"""

from __future__ import annotations

from modelyard.config.schema import GatewayConfig, ModelConfig
from modelyard.engine_programs import program_path
from modelyard.engines.base import (
    Capabilities,
    LaunchSpec,
    MemoryBudget,
    bearer_headers,
    engine_env,
    gpu_env,
    gpu_share,
    owned_flag_problems,
    served_name,
)

SERVER_SCRIPT = program_path("diffusion_server.py")
"""The server file, shipped inside this package and run by path (it imports nothing from us)."""

# Flags the gateway owns: a user setting them would break routing or health checks.
_GATEWAY_OWNED_FLAGS = {
    "--model": "use 'model:' instead",
    "--port": "the gateway picks the port",
    "--host": "the gateway binds engines to 127.0.0.1",
    "--served-name": "use 'served_name:' instead",
    "--memory-fraction": "the gateway derives it from the planned GPU memory",
}


class DiffusionEngine:
    """Engine kind `diffusion`: one diffusers text-to-image pipeline behind OpenAI's images API."""

    def problems(self, name: str, model: ModelConfig, gateway: GatewayConfig) -> list[str]:
        return owned_flag_problems(name, model.args, _GATEWAY_OWNED_FLAGS)

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
        assert model.model is not None  # the schema requires it for this kind
        served = served_name(name, model)
        argv = [
            *(model.executable or gateway.diffusion.executable),
            str(SERVER_SCRIPT),
            "--model",
            model.model,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--served-name",
            served,
        ]
        fraction = gpu_share(budget, digits=3)
        if fraction is not None:
            argv += ["--memory-fraction", fraction]
        argv += list(model.args)
        return LaunchSpec(
            argv=argv,
            # Unbuffered, so the gateway's log capture shows load progress and errors promptly.
            env={**gpu_env(budget), "PYTHONUNBUFFERED": "1", **engine_env(model, gateway)},
            health_path=model.health_path or "/health",
            expect_served_name=served,
            capabilities=Capabilities(),
            upstream_headers=bearer_headers(model.engine_api_key),
        )
