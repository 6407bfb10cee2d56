"""Every config example in the README is a valid config, so the docs stay true."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from modelyard.config import GatewayConfig, parse_config

README = Path(__file__).resolve().parent.parent / "README.md"


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)


def test_readme_has_config_examples():
    assert any("models:" in block for block in yaml_blocks())


def test_every_readme_config_example_validates():
    environ = {"HF_TOKEN": "hf_test", "MODELYARD_HOME": "/tmp/modelyard-home"}
    for block in yaml_blocks():
        document = yaml.safe_load(block)
        if isinstance(document, dict) and set(document) & set(GatewayConfig.model_fields):
            parse_config(document, "README.md", environ)
        else:
            # Fragments (a model's section) are checked inside a minimal config.
            parse_config({"models": document}, "README.md", environ)
