"""`modelyard check` plans before it serves: models that can never fit, pinned sets larger than
a GPU, missing weights, adapter folders and programs, misspelled keys; all in one run, and
`serve` refuses what `check` calls an error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelyard.checking.preflight import preflight
from modelyard.config import ConfigError, parse_config
from modelyard.placement.policy import GpuCapacity

GIB = 1024**3
ONE_24_GIB_GPU = [{"index": 0, "memory": "24GiB"}]


def command_model(**settings: Any) -> dict[str, Any]:
    return {"engine": "command", "command": ["/bin/sh", "-c", "sleep 1", "{port}"], **settings}


def run_check(tmp_path: Path, config: dict[str, Any], verb: str = "check") -> tuple[int, str]:
    path = tmp_path / "modelyard.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), **config}))
    argv = [sys.executable, "-m", "modelyard", verb, "-c", str(path)]
    if verb == "serve":
        argv += ["--port", "0"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return result.returncode, result.stdout + result.stderr


def test_a_model_larger_than_any_gpu_is_an_error() -> None:
    config = parse_config(
        {"gpus": ONE_24_GIB_GPU, "models": {"big": command_model(memory="40GiB")}}
    )
    found = preflight(config)
    assert len(found.errors) == 1
    assert "models.big: can never fit (40.0 GiB per GPU)" in found.errors[0]
    assert "GPU 0 has 24.0 GiB total" in found.errors[0]


def test_a_model_that_never_fits_but_has_fallbacks_is_a_warning() -> None:
    config = parse_config(
        {
            "gpus": ONE_24_GIB_GPU,
            "models": {
                "big": command_model(memory="40GiB", fallbacks=["small"]),
                "small": command_model(memory="8GiB"),
            },
        }
    )
    found = preflight(config)
    assert found.errors == []
    assert any("its fallbacks (small) serve it" in warning for warning in found.warnings)


def test_pinned_models_that_exceed_a_gpu_together_are_named() -> None:
    config = parse_config(
        {
            "gpus": ONE_24_GIB_GPU,
            "models": {
                "a": command_model(memory="14GiB", pinned=True),
                "b": command_model(memory="14GiB", pinned=True),
                "c": command_model(memory="14GiB"),  # not pinned: it may be evicted
            },
        }
    )
    found = preflight(config)
    assert len(found.errors) == 1
    assert "pinned models a, b cannot all be loaded at once" in found.errors[0]


def test_two_gpus_hold_the_two_pinned_models() -> None:
    config = parse_config(
        {
            "gpus": [{"index": 0, "memory": "24GiB"}, {"index": 1, "memory": "24GiB"}],
            "models": {
                "a": command_model(memory="14GiB", pinned=True),
                "b": command_model(memory="14GiB", pinned=True),
            },
        }
    )
    assert preflight(config).errors == []


def test_detected_gpus_are_used_when_none_are_declared() -> None:
    config = parse_config({"models": {"big": command_model(memory="40GiB")}})
    assert preflight(config).errors == []  # no GPU known: nothing to plan against
    found = preflight(config, [GpuCapacity(0, 24 * GIB)])
    assert "can never fit" in found.errors[0]


def test_missing_programs_are_named(tmp_path: Path) -> None:
    not_executable = tmp_path / "vllm"
    not_executable.write_text("#!/bin/sh\n")
    config = parse_config(
        {
            "vllm": {"executable": ["vllm-is-not-installed", "serve"]},
            "models": {
                "chat": {"model": "org/chat"},
                "chat2": {"model": "org/chat2"},
                "own": {"model": "org/own", "executable": [str(not_executable), "serve"]},
                "tool": {"engine": "command", "command": ["no-such-server", "--port", "{port}"]},
                "gone": {"engine": "command", "command": [str(tmp_path / "gone"), "{port}"]},
            },
        }
    )
    errors = preflight(config, environ={"PATH": str(tmp_path), "HF_HOME": str(tmp_path)}).errors
    assert errors == [
        "vllm.executable: program 'vllm-is-not-installed' is not on PATH; give its full path "
        "(needed by 'chat', 'chat2')",
        f"models.own.executable: program '{not_executable}' is not executable (needed by 'own')",
        "models.tool.command: program 'no-such-server' is not on PATH; give its full path "
        "(needed by 'tool')",
        f"models.gone.command: program '{tmp_path / 'gone'}' does not exist (needed by 'gone')",
    ]


def test_an_engine_env_path_is_where_its_program_is_looked_up(tmp_path: Path) -> None:
    program = tmp_path / "bin" / "my-server"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    config = parse_config(
        {
            "models": {
                "tool": command_model(
                    command=["my-server", "{port}"], env={"PATH": str(program.parent)}
                )
            }
        }
    )
    assert preflight(config, environ={"PATH": "/nowhere"}).errors == []


def test_missing_weights_and_adapter_folders_are_warnings(tmp_path: Path) -> None:
    config = parse_config(
        {
            "vllm": {"executable": ["/bin/sh"]},
            "models": {
                "local": {
                    "model": str(tmp_path / "weights"),
                    "lora": {
                        "adapters": {"sql": str(tmp_path / "sql")},
                        "adapter_dirs": [str(tmp_path / "adapters")],
                    },
                },
                "hub": {"model": "org/not-downloaded"},
            },
        }
    )
    found = preflight(config, environ={"PATH": "/bin", "HF_HOME": str(tmp_path / "hf")})
    assert found.errors == []
    assert found.warnings == [
        f"models.local.model: weights '{tmp_path / 'weights'}' do not exist (yet); the model "
        "cannot start until they do",
        f"models.local.lora.adapters.sql: folder '{tmp_path / 'sql'}' does not exist (yet); "
        "the adapter is refused until it does",
        f"models.local.lora.adapter_dirs.0: folder '{tmp_path / 'adapters'}' does not exist "
        "(yet); it is scanned again until it does",
        "models.hub.model: 'org/not-downloaded' is not in the Hugging Face cache; its first "
        "start downloads it (or run `modelyard pull org/not-downloaded` ahead of time)",
    ]


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("models.m.idle_timout", "did you mean 'idle_timeout'?"),
        ("models.m.lora.max_lora", "did you mean 'max_loras'?"),
        ("defaults.start_timout", "did you mean 'start_timeout'?"),
        ("limits.max_queue_per_modle", "did you mean 'max_queue_per_model'?"),
        ("modles", "did you mean 'models'?"),
    ],
)
def test_unknown_keys_get_a_suggestion(key: str, suggestion: str) -> None:
    document: dict[str, Any] = {"models": {"m": {"model": "x", "lora": {}}}}
    *parents, last = key.split(".")
    section = document
    for part in parents:
        section = section.setdefault(part, {})
    section[last] = 1
    with pytest.raises(ConfigError) as error:
        parse_config(document)
    assert f"{key}: unknown setting; {suggestion}" in error.value.problems[0]


def test_a_key_like_nothing_gets_no_suggestion() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"models": {"m": {"model": "x", "zzzz": 1}}})
    assert error.value.problems == ["<config>: models.m.zzzz: unknown setting"]


def test_fallbacks_must_name_other_models() -> None:
    with pytest.raises(ConfigError, match="names unknown model 'nope' as a fallback"):
        parse_config({"models": {"m": command_model(fallbacks=["nope"])}})
    with pytest.raises(ConfigError, match="names itself as a fallback"):
        parse_config({"models": {"m": command_model(fallbacks=["m"])}})


def test_check_reports_every_problem_in_one_run_and_serve_refuses(tmp_path: Path) -> None:
    config = {
        "gpus": ONE_24_GIB_GPU,
        "models": {
            "big": command_model(memory="40GiB"),
            "a": command_model(memory="14GiB", pinned=True),
            "b": command_model(memory="14GiB", pinned=True),
            "tool": command_model(command=["no-such-server", "{port}"]),
            "local": command_model(),
        },
    }
    for verb in ("check", "serve"):
        status, output = run_check(tmp_path, config, verb)
        assert status == 1, output
        assert "models.big: can never fit" in output
        assert "pinned models a, b cannot all be loaded at once" in output
        assert "program 'no-such-server' is not on PATH" in output
        assert "config OK" not in output


def test_check_accepts_a_config_whose_only_problems_are_warnings(tmp_path: Path) -> None:
    config = {
        "gpus": ONE_24_GIB_GPU,
        "models": {
            "big": command_model(memory="40GiB", fallbacks=["small"]),
            "small": command_model(memory="8GiB"),
        },
    }
    status, output = run_check(tmp_path, config)
    assert status == 0, output
    assert "its fallbacks (small) serve it" in output
    assert "config OK" in output


def test_a_config_for_another_machine_skips_this_machines_checks(tmp_path: Path) -> None:
    config = {
        "gpus": ONE_24_GIB_GPU,
        "models": {"tool": command_model(command=["/opt/image/bin/server", "{port}"])},
    }
    path = tmp_path / "modelyard.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), **config}))
    argv = [sys.executable, "-m", "modelyard", "check", "-c", str(path)]
    assert subprocess.run(argv, capture_output=True, check=False).returncode == 1
    skipped = subprocess.run(
        [*argv, "--skip-machine-checks"], capture_output=True, text=True, check=False
    )
    assert skipped.returncode == 0, skipped.stderr
    assert "config OK" in skipped.stdout
