"""What a config reload changes, model by model: a pure comparison of two validated configs.

A model's *engine configuration* is everything that shapes the process (or remote server) its
engine is: the argv, env and health check its engine kind makes from the config (so a changed
`defaults.env` or `vllm.executable` counts for every model it reaches), the served name, the
engine's key and its placement. Everything else about a model (aliases, route, timeouts,
queue bound, pinning) is applied to the running engine as it is, and so are keys, limits,
groups and the log format. A few settings are bound at start (the listen address, the state
directory, the GPU inventory) and are reported as not applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelyard.config.schema import GatewayConfig, ModelConfig
from modelyard.engines import engine_kind

# Model settings applied live, with no engine touched.
LIVE_MODEL_FIELDS = frozenset(
    {
        "aliases",
        "route",
        "open_route",
        "idle_timeout",
        "start_timeout",
        "start_timeout_max",
        "fallbacks",
        "fallback_may_evict",
        "loading_content",
        "stop_grace",
        "first_byte_timeout",  # read per request from the live config
        "max_queue",
        "pinned",
        "preload",
        "replicas",  # slots added or drained by the scheduler; running engines go on
    }
)
# Top-level settings applied live (keys, limits, groups, timeouts' defaults, log format).
LIVE_SETTINGS = (
    "auth",
    "limits",
    "groups",
    "log_format",
    "host_ram_for_sleep",
    "cors",
    "allowed_hosts",
)
# Compared model by model (`models`, and what reaches engines: `defaults`, `vllm`, `diffusion`).
PER_MODEL_SETTINGS = ("models", "defaults", "vllm", "diffusion")
# Bound when the gateway starts: a reload reports them and leaves them as they are.
# (`tls`: the certificate and key files themselves are read again on SIGHUP; `runtime` and
# `ray`: the gateway connects to its cluster once.)
START_ONLY_SETTINGS = ("listen", "state_dir", "gpus", "tls", "runtime", "ray", "proxy_workers")


@dataclass(frozen=True)
class ConfigChange:
    """One change, as the reload's answer and its event show it."""

    what: str  # model_added, model_removed, engine_changed, model_settings, setting
    model: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "model": self.model, "detail": self.detail}


@dataclass
class ReloadPlan:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    engine_changed: list[str] = field(default_factory=list)
    changes: list[ConfigChange] = field(default_factory=list)
    not_applied: list[str] = field(default_factory=list)


def engine_fingerprint(name: str, model: ModelConfig, config: GatewayConfig) -> tuple[Any, ...]:
    """Everything that makes this model's engine what it is (port and GPU budget aside)."""
    spec = engine_kind(model.engine).launch_spec(name, model, config, 0, None)
    placement = model.model_dump(
        include={"engine", "gpus", "tensor_parallel", "memory", "sleep", "lora", "served_name"}
    )
    return (
        tuple(spec.argv),
        tuple(sorted(spec.env.items())),
        spec.health_path,
        spec.expect_served_name,
        tuple(sorted(spec.upstream_headers.items())),
        spec.remote_url,
        repr(placement),
    )


def plan_reload(old: GatewayConfig, new: GatewayConfig) -> ReloadPlan:
    """The changes from `old` to `new`, in a stable order."""
    plan = ReloadPlan()
    for name in new.models:
        if name not in old.models:
            plan.added.append(name)
            plan.changes.append(ConfigChange("model_added", name, _describe(new.models[name])))
    for name in old.models:
        if name not in new.models:
            plan.removed.append(name)
            plan.changes.append(
                ConfigChange("model_removed", name, "drained, then its engine stopped")
            )
    for name, model in new.models.items():
        before = old.models.get(name)
        if before is None:
            continue
        if engine_fingerprint(name, before, old) != engine_fingerprint(name, model, new):
            plan.engine_changed.append(name)
            fields = _changed_fields(before, model) - LIVE_MODEL_FIELDS
            what = ", ".join(sorted(fields)) or "shared settings (defaults, executables)"
            plan.changes.append(
                ConfigChange(
                    "engine_changed", name, f"{what}: a new engine after the old one drains"
                )
            )
            if before.lora != model.lora:
                plan.not_applied.append(
                    f"models.{name}.lora: adapter settings take effect at the next restart"
                )
        live = _changed_fields(before, model) & LIVE_MODEL_FIELDS
        if live:
            plan.changes.append(
                ConfigChange("model_settings", name, "changed live: " + ", ".join(sorted(live)))
            )
    changed_defaults = _changed_fields(old.defaults, new.defaults)
    if changed_defaults:
        applied = sorted(changed_defaults)
        plan.changes.append(ConfigChange("setting", None, "defaults: " + ", ".join(applied)))
    for key in LIVE_SETTINGS:
        if getattr(old, key) != getattr(new, key):
            plan.changes.append(ConfigChange("setting", None, f"{key}: {_summary(old, new, key)}"))
    for key in ("vllm", "diffusion"):
        if getattr(old, key) != getattr(new, key):
            plan.changes.append(ConfigChange("setting", None, f"{key}: executable"))
    for key in START_ONLY_SETTINGS:
        if getattr(old, key) != getattr(new, key):
            plan.not_applied.append(f"{key}: bound when the gateway starts; restart to change it")
    return plan


def _changed_fields(before: Any, after: Any) -> set[str]:
    old, new = before.model_dump(), after.model_dump()
    return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


def _describe(model: ModelConfig) -> str:
    where = f" at {model.url}" if model.url else ""
    return f"engine {model.engine}{where}: available now"


def _summary(old: GatewayConfig, new: GatewayConfig, key: str) -> str:
    if key == "auth":
        before = {k.name: k for k in old.auth.keys}
        after = {k.name: k for k in new.auth.keys}
        parts = []
        if added := sorted(after.keys() - before.keys()):
            parts.append("keys added " + ", ".join(added))
        if removed := sorted(before.keys() - after.keys()):
            parts.append("keys removed " + ", ".join(removed))
        if changed := sorted(n for n in before.keys() & after.keys() if before[n] != after[n]):
            parts.append("keys changed " + ", ".join(changed))
        if old.auth.allow_unauthenticated != new.auth.allow_unauthenticated:
            parts.append("allow_unauthenticated")
        return "; ".join(parts) or "changed"
    if key in ("limits", "groups"):
        fields = (
            _changed_fields(old.limits, new.limits)
            if key == "limits"
            else (set(old.groups) ^ set(new.groups))
            | {g for g in set(old.groups) & set(new.groups) if old.groups[g] != new.groups[g]}
        )
        return ", ".join(sorted(fields))
    return f"{getattr(old, key)!s} -> {getattr(new, key)!s}"
