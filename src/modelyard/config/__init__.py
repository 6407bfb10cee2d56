"""Configuration: the YAML file's schema and its loader."""

from modelyard.config.loader import ConfigError, load_config, parse_config
from modelyard.config.schema import GatewayConfig, ModelConfig

__all__ = ["ConfigError", "GatewayConfig", "ModelConfig", "load_config", "parse_config"]
