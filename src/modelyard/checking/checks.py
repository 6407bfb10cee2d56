"""A config as the gateway uses it: the schema, then each engine kind's own checks.

Shared by `modelyard check`, `modelyard serve` and a config reload, so all three accept and
refuse exactly the same files.
"""

from __future__ import annotations

from pathlib import Path

from modelyard.config.loader import ConfigError, load_config
from modelyard.config.schema import GatewayConfig
from modelyard.config.state_home import LEGACY_STATE_DIR, legacy_state_warning
from modelyard.engines import engine_kind


def load_checked_config(path: str | Path) -> GatewayConfig:
    """Read, validate and check a config file; `ConfigError` lists every problem found."""
    config = load_config(path)
    problems = [
        f"{path}: {problem}"
        for name, model in config.models.items()
        for problem in engine_kind(model.engine).problems(name, model, config)
    ]
    if problems:
        raise ConfigError(problems)
    return config


def config_warnings(path: str | Path, config: GatewayConfig) -> list[str]:
    """Settings that are valid but probably wrong, as `FILE: key: what` lines."""
    warnings = [
        f"{path}: {warning}"
        for name, model in config.models.items()
        for warning in engine_kind(model.engine).warnings(name, model, config)
    ]
    if "state_dir" not in config.model_fields_set and config.state_dir == LEGACY_STATE_DIR:
        warnings.append(f"{path}: {legacy_state_warning()}")
    return warnings
