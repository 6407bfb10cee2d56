"""What a valid config would meet when it serves: GPUs too small, files and programs missing.

The schema says whether a file is well formed; this says whether it can work on this machine.
It runs the same placement policy the gateway uses, against the declared (or detected) GPUs
and no running engines, so "can never fit" means what the scheduler would answer. Everything
is reported in one run: a user fixing a config should not meet its problems one at a time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelyard.config.schema import STARTED_KINDS, GatewayConfig, ModelConfig
from modelyard.placement.estimate import estimate_bytes, hub_snapshot
from modelyard.placement.policy import (
    CannotFit,
    Engine,
    EngineState,
    GpuCapacity,
    Target,
    gib,
    plan_placement,
)


@dataclass
class Preflight:
    """`errors` stop `serve`; `warnings` are printed and served anyway."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def preflight(
    config: GatewayConfig,
    gpus: Sequence[GpuCapacity] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Preflight:
    """Every problem the config would meet on this machine; `gpus` defaults to the declared."""
    environ = os.environ if environ is None else environ
    found = Preflight()
    _check_programs(config, environ, found)
    for name, model in config.models.items():
        _check_files(name, model, environ, found)
    if gpus is None and config.gpus is not None:
        gpus = [GpuCapacity(gpu.index, gpu.memory) for gpu in config.gpus]
    if gpus:
        _check_fit(config, gpus, environ, found)
    return found


def program_of(name: str, model: ModelConfig, config: GatewayConfig) -> tuple[str, str] | None:
    """The program a model's engine runs, and the setting that names it."""
    if model.engine == "vllm":
        if model.executable:
            return model.executable[0], f"models.{name}.executable"
        return config.vllm.executable[0], "vllm.executable"
    if model.engine == "diffusion":
        return config.diffusion.executable[0], "diffusion.executable"
    if model.engine == "command" and model.command:
        return model.command[0], f"models.{name}.command"
    return None


def _check_programs(config: GatewayConfig, environ: Mapping[str, str], found: Preflight) -> None:
    # One line a missing program, naming every model it would have started.
    users: dict[tuple[str, str, str], list[str]] = {}
    for name, model in config.models.items():
        program = program_of(name, model, config)
        if program is None:
            continue
        argv0, setting = program
        # The engine's own PATH, when its env sets one, is the PATH its program is found in.
        path = {**config.defaults.env, **model.env}.get("PATH", environ.get("PATH", os.defpath))
        problem = _program_problem(argv0, path)
        if problem is not None:
            users.setdefault((setting, argv0, problem), []).append(name)
    for (setting, argv0, problem), names in users.items():
        models = ", ".join(repr(name) for name in names)
        found.errors.append(f"{setting}: program {argv0!r} {problem} (needed by {models})")


def _program_problem(argv0: str, path: str) -> str | None:
    if "/" in argv0:
        executable = Path(argv0).expanduser()
        if not executable.is_file():
            return "does not exist"
        if not os.access(executable, os.X_OK):
            return "is not executable"
        return None
    if shutil.which(argv0, path=path) is None:
        return "is not on PATH; give its full path"
    return None


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


def _check_files(
    name: str, model: ModelConfig, environ: Mapping[str, str], found: Preflight
) -> None:
    if model.engine in ("vllm", "diffusion") and model.model:
        weights = model.model
        if _looks_like_path(weights):
            if not Path(weights).expanduser().exists():
                found.warnings.append(
                    f"models.{name}.model: weights {weights!r} do not exist (yet); "
                    "the model cannot start until they do"
                )
        elif weights.count("/") == 1 and hub_snapshot(weights, environ) is None:
            found.warnings.append(
                f"models.{name}.model: {weights!r} is not in the Hugging Face cache; its first "
                f"start downloads it (or run `modelyard pull {weights}` ahead of time)"
            )
    if model.lora is not None:
        for adapter, folder in model.lora.adapters.items():
            if not Path(folder).expanduser().is_dir():
                found.warnings.append(
                    f"models.{name}.lora.adapters.{adapter}: folder {folder!r} does not exist "
                    "(yet); the adapter is refused until it does"
                )
        for index, folder in enumerate(model.lora.adapter_dirs):
            if not Path(folder).expanduser().is_dir():
                found.warnings.append(
                    f"models.{name}.lora.adapter_dirs.{index}: folder {folder!r} does not "
                    "exist (yet); it is scanned again until it does"
                )


def _target(
    name: str, model: ModelConfig, config: GatewayConfig, environ: Mapping[str, str]
) -> Target | None:
    if model.engine not in STARTED_KINDS:
        return None
    estimate = estimate_bytes(
        footprint=None,
        hint_bytes=model.memory,
        model=model.model,
        tensor_parallel=model.tensor_parallel,
        environ=environ,
    )
    if estimate.bytes_per_gpu is None:
        return None  # unknown size: the first start measures it, nothing to say yet
    return Target(
        name,
        estimate.bytes_per_gpu,
        tuple(model.gpus or ()),
        model.tensor_parallel,
    )


def _check_fit(
    config: GatewayConfig,
    gpus: Sequence[GpuCapacity],
    environ: Mapping[str, str],
    found: Preflight,
) -> None:
    targets = {
        name: target
        for name, model in config.models.items()
        if (target := _target(name, model, config, environ)) is not None
    }
    for name, target in targets.items():
        plan = plan_placement(target, gpus, [], now=0.0, host_ram_for_sleep=None)
        if isinstance(plan, CannotFit):
            model = config.models[name]
            size = f"{gib(target.bytes_per_gpu or 0)} per GPU"
            if model.fallbacks:
                found.warnings.append(
                    f"models.{name}: can never fit ({size}): {plan.reason}; its fallbacks "
                    f"({', '.join(model.fallbacks)}) serve it"
                )
            else:
                found.errors.append(f"models.{name}: can never fit ({size}): {plan.reason}")
    _check_pinned(config, gpus, targets, found)


def _check_pinned(
    config: GatewayConfig,
    gpus: Sequence[GpuCapacity],
    targets: Mapping[str, Target],
    found: Preflight,
) -> None:
    # Pinned engines are never evicted: place them one after another, as the gateway would
    # once they had all been used, and the first one left without room names the set.
    placed: list[Engine] = []
    for name, model in config.models.items():
        target = targets.get(name)
        if not model.pinned or target is None:
            continue
        alone = plan_placement(target, gpus, [], now=0.0, host_ram_for_sleep=None)
        if isinstance(alone, CannotFit):
            continue  # reported on its own
        plan = plan_placement(target, gpus, placed, now=0.0, host_ram_for_sleep=None)
        if isinstance(plan, CannotFit):
            together = ", ".join([*(engine.name for engine in placed), name])
            found.errors.append(
                f"models: the pinned models {together} cannot all be loaded at once "
                f"(pinned models are never evicted): {plan.reason}"
            )
            continue
        placed.append(
            Engine(
                name,
                EngineState.READY,
                plan.gpus,
                plan.bytes_per_gpu,
                pinned=True,
            )
        )


def detected_gpus(config: GatewayConfig) -> list[GpuCapacity] | None:
    """The declared GPUs, else those NVML reports on this machine (None: no GPU to plan)."""
    if config.gpus is not None:
        return [GpuCapacity(gpu.index, gpu.memory) for gpu in config.gpus]
    if config.runtime != "process":
        return None  # a cluster's GPUs are read by its nodes when the gateway runs
    from modelyard.placement.inventory import GpuInventoryError, NvmlInventory

    try:
        return [GpuCapacity(gpu.index, gpu.total_bytes) for gpu in NvmlInventory().gpus()]
    except GpuInventoryError:
        return None
