"""A model's request policy, applied to each JSON body before the engine sees it.

- `params.strip`: fields removed (e.g. `logit_bias` on a shared box);
- `params.default`: fields used when the client sends none of its own;
- `params.set`: fields forced whatever the client sent (a context cap, a temperature);
- a variant (`models.X.variants.NAME`) is the same engine with its own params, applied on top
  of the model's, as llama-swap's `setParams` on a second name;
- `priority`: on an engine started with vLLM's `--scheduling-policy priority`, the key's
  priority is written into every request, whatever the client sent (a client must not be able
  to move itself ahead of other keys in the engine's queue).

No I/O, no web framework: the serving path calls `apply_policy` on the parsed body.
"""

from __future__ import annotations

import copy
from typing import Any

from modelyard.config.schema import DefaultsConfig, ModelConfig, ParamsConfig


def policy_for(model: ModelConfig, variant: str | None) -> list[ParamsConfig]:
    """The params that apply to a request for `model` by the name `variant`, model's first."""
    layers = [model.params]
    if variant is not None and variant in model.variants:
        layers.append(model.variants[variant])
    return layers


def apply_policy(payload: dict[str, Any], layers: list[ParamsConfig]) -> bool:
    """Apply each layer's strip, default and set to `payload` in place; True if it changed."""
    changed = False
    for params in layers:
        for name in params.strip:
            if name in payload:
                del payload[name]
                changed = True
        for name, value in params.default.items():
            if payload.get(name) is None:
                payload[name] = copy.deepcopy(value)
                changed = True
        for name, value in params.set.items():
            if payload.get(name) != value:
                payload[name] = copy.deepcopy(value)
                changed = True
    return changed


def schedules_by_priority(model: ModelConfig, defaults: DefaultsConfig) -> bool:
    """Whether the model's engine is started with vLLM's `--scheduling-policy priority` (in
    its args, or in the command of a vLLM started by `engine: command`)."""
    if model.engine == "vllm":
        args = [*defaults.args, *model.args]
    elif model.engine == "command":
        args = [*(model.command or []), *model.args]
    else:
        return False
    for index, arg in enumerate(args):
        if arg == "--scheduling-policy=priority":
            return True
        if arg == "--scheduling-policy" and args[index + 1 : index + 2] == ["priority"]:
            return True
    return False


def set_priority(payload: dict[str, Any], priority: int) -> bool:
    """The key's priority in vLLM's `priority` field; True if the body changed."""
    if payload.get("priority") == priority and type(payload.get("priority")) is int:
        return False
    payload["priority"] = priority
    return True
