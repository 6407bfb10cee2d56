"""The docs' config examples are valid configs, the configuration reference is the schema's,
and the migration page maps every common launcher variable."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from modelyard.config import GatewayConfig, parse_config
from modelyard.config.reference import sections
from tests.docs.blocks import DOCS, PAGES, REPO, blocks


def test_every_page_is_in_the_site_navigation() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert f": {page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"


def test_config_examples_exist() -> None:
    assert any("models:" in block.text for block in blocks("yaml"))


def test_every_config_example_validates() -> None:
    environ = {"HF_TOKEN": "hf_test", "MODELYARD_HOME": "/tmp/modelyard-home"}
    for block in blocks("yaml"):
        document = yaml.safe_load(block.text)
        if isinstance(document, dict) and set(document) & set(GatewayConfig.model_fields):
            parse_config(document, block.page, environ)
        else:
            # Fragments (a model's section) are checked inside a minimal config.
            parse_config({"models": document}, block.page, environ)


def test_the_configuration_reference_is_the_schemas() -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "modelyard.config.reference", "--check", "docs/configuration.md"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_the_reference_names_every_key() -> None:
    text = (DOCS / "configuration.md").read_text()
    keys = [row.key for _, _, rows in sections() for row in rows]
    expected = ("ray.warm_actors", "ray.node_check_interval", "models.<name>.lora.scan_interval",
                "gpus[].name", "proxy_workers", "limits.shutdown_grace",
                "limits.health_check_interval", "defaults.crash_backoff_max")  # fmt: skip
    assert set(expected) <= set(keys)
    for key in keys:
        assert f"| `{key}` |" in text, key


# The variables the launchers people migrate from are configured with (their compose files
# and READMEs): each must be in the migration page's table.
LAUNCHER_VARIABLES = (
    "ALLOWED_MODELS_JSON", "IDLE_SECONDS", "START_TIMEOUT_SECONDS", "VLLM_MAX_MODEL_LEN_GLOBAL",
    "VLLM_GPU_MEMORY_UTILIZATION", "VLLM_INACTIVITY_TIMEOUT", "VLLM_SWAP_SPACE", "VLLM_API_KEY",
    "CUDA_VISIBLE_DEVICES", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "VLLM_CACHE_ROOT",
    "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LOG_LEVEL", "MODEL_NAME",
    "SERVER_URL", "OPENAI_API_BASE_URL", "LITELLM_MASTER_KEY", "LITELLM_URL",
    "GATEWAY_CONTAINER_NAME", "DOCKER_NETWORK_NAME", "TS_AUTHKEY", "COMPOSE_PROJECT_NAME",
)  # fmt: skip


def test_the_migration_page_maps_each_launcher_variable() -> None:
    rows = [
        line for line in (DOCS / "migrating.md").read_text().splitlines() if line.startswith("| `")
    ]
    mapped = {
        name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])
    }
    assert set(LAUNCHER_VARIABLES) <= mapped, set(LAUNCHER_VARIABLES) - mapped


def test_pages_speak_to_users() -> None:
    # A user's docs: no issue numbers or project history in what they read.
    for page in PAGES:
        text = page.read_text()
        for pattern in (r"\bissue \d+", r"\bseed \d{3}", r"\bthis session", r"\bbefore this\b"):
            assert not re.search(pattern, text, re.IGNORECASE), (page.name, pattern)


def test_a_field_without_a_description_stops_the_generator(monkeypatch) -> None:
    from modelyard.config import reference
    from modelyard.config.schema import LimitsConfig

    field = LimitsConfig.model_fields["shutdown_grace"]
    monkeypatch.setattr(field, "description", None)
    assert reference.main(["--write", "/dev/null"]) == 1
