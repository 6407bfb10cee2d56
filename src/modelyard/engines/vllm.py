"""vLLM's OpenAI server: command line, memory budget, LoRA and sleep flags."""

from __future__ import annotations

from modelyard.config.schema import GatewayConfig, ModelConfig
from modelyard.engines.base import Capabilities, LaunchSpec, MemoryBudget, gpu_env, served_name

# Flags the gateway owns: a user setting them would break routing or memory planning.
_GATEWAY_OWNED_FLAGS = {
    "--port": "the gateway picks the port",
    "--host": "the gateway binds engines to 127.0.0.1",
    "--served-model-name": "use 'served_name:' instead",
    "--enable-sleep-mode": "use 'sleep: 1' or 'sleep: 2' instead",
    "--enable-lora": "use a 'lora:' section instead",
    "--lora-modules": "use 'lora: adapters:' instead",
    "--max-loras": "use 'lora: max_loras:' instead",
    "--max-lora-rank": "use 'lora: max_rank:' instead",
    "--max-cpu-loras": "use 'lora: max_cpu_loras:' instead",
    "--max-model-len": "use 'max_model_len:' instead",
    "--tensor-parallel-size": "use 'tensor_parallel:' instead",
}
_BUDGET_FLAGS = ("--gpu-memory-utilization", "--kv-cache-memory-bytes")
# The ranks vLLM 0.32 accepts for --max-lora-rank (others exit at start).
_LORA_RANKS = frozenset({1, 8, 16, 32, 64, 128, 256, 320, 512})


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


class VllmEngine:
    def problems(self, name: str, model: ModelConfig, gateway: GatewayConfig) -> list[str]:
        found = []
        if model.lora is not None and model.lora.max_rank not in _LORA_RANKS:
            found.append(
                f"models.{name}.lora.max_rank: vLLM accepts only "
                f"{', '.join(map(str, sorted(_LORA_RANKS)))} (--max-lora-rank); "
                f"use {min(r for r in _LORA_RANKS if r >= model.lora.max_rank)}"
                if model.lora.max_rank <= max(_LORA_RANKS)
                else f"models.{name}.lora.max_rank: {model.lora.max_rank} is above vLLM's largest, "
                f"{max(_LORA_RANKS)}"
            )
        for index, arg in enumerate(model.args):
            flag = _flag_name(arg)
            if flag in _GATEWAY_OWNED_FLAGS:
                found.append(
                    f"models.{name}.args.{index}: {flag} is set by the gateway; "
                    f"{_GATEWAY_OWNED_FLAGS[flag]}"
                )
            if flag in _BUDGET_FLAGS and gateway.gpus is not None:
                found.append(
                    f"models.{name}.args.{index}: {flag} is decided by the gateway "
                    "from the measured footprint when GPUs are managed"
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
        executable = list(model.executable or gateway.vllm.executable)
        served = served_name(name, model)
        argv = [
            *executable,
            model.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            served,
        ]
        if model.max_model_len is not None:
            argv += ["--max-model-len", str(model.max_model_len)]
        if model.tensor_parallel > 1:
            argv += ["--tensor-parallel-size", str(model.tensor_parallel)]
        if budget is not None and budget.gpu_total_bytes > 0:
            # A fraction of the whole GPU (vLLM's meaning), rounded down so we never overshoot.
            fraction = int(budget.bytes_per_gpu / budget.gpu_total_bytes * 10_000) / 10_000
            argv += ["--gpu-memory-utilization", f"{max(fraction, 0.01):.4f}"]
        env = {**gpu_env(budget), **model.env}
        if model.sleep:
            argv.append("--enable-sleep-mode")
            env.setdefault("VLLM_SERVER_DEV_MODE", "1")  # exposes /sleep, /wake_up, /is_sleeping
        if model.lora is not None:
            lora = model.lora
            argv += [
                "--enable-lora",
                "--max-loras",
                str(lora.max_loras),
                "--max-lora-rank",
                str(lora.max_rank),
            ]
            if lora.max_cpu_loras is not None:
                argv += ["--max-cpu-loras", str(max(lora.max_cpu_loras, lora.max_loras))]
            if lora.adapters:
                argv += [
                    "--lora-modules",
                    *(f"{adapter}={path}" for adapter, path in lora.adapters.items()),
                ]
            env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        argv += list(model.args)
        return LaunchSpec(
            argv=argv,
            env=env,
            health_path=model.health_path or "/health",
            expect_served_name=served,
            capabilities=Capabilities(sleep_level=model.sleep, lora=model.lora is not None),
        )
