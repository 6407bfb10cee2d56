"""examples/demo.yaml loads, validates and turns into the vLLM command lines we checked by hand."""

from __future__ import annotations

import pytest

from modelyard.config import ConfigError, load_config
from modelyard.demo import demo_config_path
from modelyard.engines.vllm import VllmEngine

ENVIRON = {
    "MODELYARD_HOME": "/yard",
    "MODELYARD_VLLM": "/yard/engine-venv/bin/modelyard-vllm",
}


@pytest.fixture
def config():
    return load_config(demo_config_path(), ENVIRON)


def test_the_demo_config_exists():
    assert demo_config_path().is_file()


def test_models_routes_and_aliases(config):
    assert set(config.models) == {"chat", "coder", "vision"}
    chat, coder = config.models["chat"], config.models["coder"]
    vision = config.models["vision"]
    assert (vision.engine, vision.route) == ("diffusion", "/vision")
    assert vision.model == "/yard/models/tiny-diffusion"
    assert (chat.route, coder.route) == ("/chat", "/coder")
    assert "smollm2" in chat.aliases
    assert chat.engine == coder.engine == "vllm"
    assert chat.model == "/yard/models/smollm2-135m-instruct"
    assert coder.model == "/yard/models/gemma3-270m"
    assert config.vllm.executable == [ENVIRON["MODELYARD_VLLM"], "serve"]
    assert chat.idle_timeout is None  # the defaults section decides
    assert 60 <= config.defaults.idle_timeout <= 1800


def test_chat_serves_the_two_adapters(config):
    lora = config.models["chat"].lora
    assert lora is not None
    assert lora.max_rank == 8
    assert lora.adapters == {
        "sql-adapter": "/yard/adapters/sql-adapter",
        "email-adapter": "/yard/adapters/email-adapter",
    }


def test_cpu_settings(config):
    for model in (m for m in config.models.values() if m.engine == "vllm"):
        assert {"--enforce-eager", "-O0"} <= set(model.args)
        assert model.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
        assert model.env["HF_HUB_OFFLINE"] == "1"
        assert model.max_model_len is not None


def test_the_vllm_command_lines(config):
    engine = VllmEngine()
    for name, model in config.models.items():
        assert engine.problems(name, model, config) == []
    spec = engine.launch_spec("chat", config.models["chat"], config, 18000, None)
    assert spec.argv[:3] == [
        ENVIRON["MODELYARD_VLLM"],
        "serve",
        "/yard/models/smollm2-135m-instruct",
    ]
    assert spec.argv[spec.argv.index("--served-model-name") + 1] == "chat"
    assert spec.argv[spec.argv.index("--max-lora-rank") + 1] == "8"
    assert "sql-adapter=/yard/adapters/sql-adapter" in spec.argv
    assert spec.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert spec.capabilities.lora
    coder = engine.launch_spec("coder", config.models["coder"], config, 18001, None)
    assert "--enable-lora" not in coder.argv


def test_the_demo_config_needs_modelyard_home():
    with pytest.raises(ConfigError, match="MODELYARD_HOME is not set"):
        load_config(demo_config_path(), {"MODELYARD_VLLM": "/x/vllm"})


def test_without_modelyard_vllm_the_config_falls_back_to_vllm_on_path():
    config = load_config(demo_config_path(), {"MODELYARD_HOME": "/yard"})
    assert config.vllm.executable == ["vllm", "serve"]
