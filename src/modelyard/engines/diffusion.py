"""The built-in image server (`diffusion_server.py`), run by a Python that has diffusers and torch.

The gateway never imports the server: it runs the file by path with `diffusion.executable` (the
engine venv's Python), so torch and diffusers stay out of the gateway's venv.
"""

from __future__ import annotations

from pathlib import Path

from modelyard.config.schema import GatewayConfig, ModelConfig
from modelyard.engines.base import Capabilities, LaunchSpec, MemoryBudget, gpu_env, served_name

SERVER_SCRIPT = Path(__file__).resolve().with_name("diffusion_server.py")
"""The server file, shipped inside this package and run by path (it imports nothing from us)."""

# Flags the gateway owns: a user setting them would break routing or health checks.
_GATEWAY_OWNED_FLAGS = {
    "--model": "use 'model:' instead",
    "--port": "the gateway picks the port",
    "--host": "the gateway binds engines to 127.0.0.1",
    "--served-name": "use 'served_name:' instead",
    "--memory-fraction": "the gateway derives it from the planned GPU memory",
}


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def memory_fraction(budget: MemoryBudget | None) -> str | None:
    """The planned share of one GPU, rounded down so the engine never takes more than planned."""
    if budget is None or budget.gpu_total_bytes <= 0 or budget.bytes_per_gpu <= 0:
        return None
    fraction = int(budget.bytes_per_gpu / budget.gpu_total_bytes * 1000) / 1000
    return f"{min(max(fraction, 0.01), 1.0):.3f}"


class DiffusionEngine:
    """Engine kind `diffusion`: one diffusers text-to-image pipeline behind OpenAI's images API."""

    def problems(self, name: str, model: ModelConfig, gateway: GatewayConfig) -> list[str]:
        found = []
        for index, arg in enumerate(model.args):
            flag = _flag_name(arg)
            if flag in _GATEWAY_OWNED_FLAGS:
                found.append(
                    f"models.{name}.args.{index}: {flag} is set by the gateway; "
                    f"{_GATEWAY_OWNED_FLAGS[flag]}"
                )
        return found

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
        fraction = memory_fraction(budget)
        if fraction is not None:
            argv += ["--memory-fraction", fraction]
        argv += list(model.args)
        return LaunchSpec(
            argv=argv,
            # Unbuffered, so the gateway's log capture shows load progress and errors promptly.
            env={**gpu_env(budget), "PYTHONUNBUFFERED": "1", **model.env},
            health_path=model.health_path or "/health",
            expect_served_name=served,
            capabilities=Capabilities(),
        )
