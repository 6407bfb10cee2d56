"""vLLM's OpenAI server: command line, memory budget, LoRA and sleep flags."""

from __future__ import annotations

from modelyard.config.schema import GatewayConfig, ModelConfig
from modelyard.engines.base import (
    Capabilities,
    LaunchSpec,
    MemoryBudget,
    bearer_headers,
    engine_env,
    flag_name,
    gpu_env,
    gpu_share,
    owned_flag_problems,
    served_name,
)

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
        found += owned_flag_problems(name, model.args, _GATEWAY_OWNED_FLAGS)
        found += [
            problem.replace(f"models.{name}.args.", "defaults.args.")
            for problem in owned_flag_problems(name, gateway.defaults.args, _GATEWAY_OWNED_FLAGS)
        ]
        if gateway.gpus is not None:
            found += [
                f"models.{name}.args.{index}: {flag_name(arg)} is decided by the gateway "
                "from the measured footprint when GPUs are managed"
                for index, arg in enumerate(model.args)
                if flag_name(arg) in _BUDGET_FLAGS
            ]
        return found

    def warnings(self, name: str, model: ModelConfig, gateway: GatewayConfig) -> list[str]:
        """Settings that work but are probably not what the user meant."""
        args = [*gateway.defaults.args, *model.args]
        if model.engine_api_key is None and any(flag_name(arg) == "--api-key" for arg in args):
            # vLLM then answers /v1/models with 401: the gateway would wait for readiness
            # until the start timeout (the seed 000 starts vLLM with --api-key).
            return [
                f"models.{name}.args: --api-key is set but engine_api_key is not; the engine "
                "will refuse the gateway's readiness checks and requests (set engine_api_key "
                "to the same key, e.g. '${env:VLLM_API_KEY}', and drop --api-key)"
            ]
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
        max_model_len = model.max_model_len or gateway.defaults.max_model_len
        if max_model_len is not None:
            argv += ["--max-model-len", str(max_model_len)]
        if model.tensor_parallel > 1:
            argv += ["--tensor-parallel-size", str(model.tensor_parallel)]
        share = gpu_share(budget, digits=4)  # a fraction of the whole GPU, vLLM's meaning
        if share is not None:
            argv += ["--gpu-memory-utilization", share]
        env = {**gpu_env(budget), **engine_env(model, gateway)}
        if model.engine_api_key and not any(flag_name(arg) == "--api-key" for arg in model.args):
            # vLLM reads its key from VLLM_API_KEY too: kept out of the argv (and so out of
            # `ps` and the engine log's first line).
            env["VLLM_API_KEY"] = model.engine_api_key
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
        argv += [*gateway.defaults.args, *model.args]
        return LaunchSpec(
            argv=argv,
            env=env,
            health_path=model.health_path or "/health",
            expect_served_name=served,
            capabilities=Capabilities(sleep_level=model.sleep, lora=model.lora is not None),
            upstream_headers=bearer_headers(model.engine_api_key),
        )
