"""The demo's adapter helper, with the engine venv's torch and peft.

The demo's real vLLM engines run through the gateway in tests/vllm/ (test_gateway_real.py,
test_lora_real.py), one at a time; starting them here as well would only add minutes.
The `demo` fixture builds the engine venv and models on first use (about 5 minutes once,
then well under a second).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelyard.demo import DemoSetup, prepare_demo, write_adapters

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo() -> DemoSetup:
    return prepare_demo()


def test_many_adapters_for_lora_tests(demo: DemoSetup, tmp_path: Path):
    paths = write_adapters(tmp_path, count=20, rank_for={"lora-07": 16}, setup=demo)
    assert [path.name for path in paths][:2] == ["lora-01", "lora-02"]
    assert len(paths) == 20
    ranks = [json.loads((path / "adapter_config.json").read_text())["r"] for path in paths]
    assert ranks.count(16) == 1
    assert ranks.count(8) == 19
    (other,) = write_adapters(tmp_path, ["for-gemma"], base=demo.coder_model, setup=demo)
    config = json.loads((other / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(demo.coder_model)
    (again,) = write_adapters(tmp_path / "again", ["lora-01"], setup=demo)
    weights = "adapter_model.safetensors"
    assert (again / weights).read_bytes() == (paths[0] / weights).read_bytes()  # reproducible
