"""Config validation: clear `FILE: key.path: what is wrong` messages, env substitution."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard.cli import main
from modelyard.config import ConfigError, load_config, parse_config
from modelyard.config.units import parse_duration, parse_size


def problems_of(document: object, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(document, "conf.yaml", environ or {})
    return error.value.problems


def test_durations_and_sizes():
    assert parse_duration("90s") == 90
    assert parse_duration("10m") == 600
    assert parse_duration(45) == 45
    assert parse_duration("250ms") == 0.25
    assert parse_size("24GiB") == 24 * 1024**3
    assert parse_size("8GB") == 8 * 1000**3
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")
    with pytest.raises(ValueError, match="not a size"):
        parse_size("12 parsecs")


def test_env_substitution_with_default_and_missing():
    config = parse_config(
        {
            "models": {
                "m": {
                    "engine": "vllm",
                    "model": "${env:WEIGHTS}/x",
                    "env": {"TOKEN": "${env:HF:-none}"},
                }
            }
        },
        environ={"WEIGHTS": "/srv/llm"},
    )
    assert config.models["m"].model == "/srv/llm/x"
    assert config.models["m"].env["TOKEN"] == "none"
    assert problems_of({"models": {"m": {"model": "${env:NOPE}"}}}) == [
        "conf.yaml: models.m.model: environment variable NOPE is not set"
    ]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"models": {"m": {"engine": "command"}}},
            "conf.yaml: models.m: engine 'command' needs 'command:'",
        ),
        ({"models": {"m": {"engine": "command", "command": ["srv"]}}}, "must contain {port}"),
        ({"models": {"m": {"engine": "vllm"}}}, "needs 'model:'"),
        (
            {"models": {"m": {"model": "x", "idle_timeout": "soon"}}},
            "conf.yaml: models.m.idle_timeout: 'soon' is not a duration",
        ),
        (
            {"models": {"m": {"model": "x", "typo_key": 1}}},
            "conf.yaml: models.m.typo_key: unknown setting",
        ),
        (
            {"models": {"a": {"model": "x", "aliases": ["b"]}, "b": {"model": "y"}}},
            "name 'b' is used by both 'b' and 'a'",
        ),
        (
            {"models": {"a": {"model": "x", "route": "/r"}, "b": {"model": "y", "route": "/r"}}},
            "route '/r' is used by both",
        ),
        ({"models": {"a": {"model": "x", "route": "/v1"}}}, "reserved"),
        ({"models": {"a": {"model": "x", "route": "coder"}}}, "is not a route"),
        ({"models": {"../etc": {"model": "x"}}}, "is not a valid model name"),
        ({"listen": "nowhere"}, "conf.yaml: listen: 'nowhere' is not HOST:PORT"),
        (
            {
                "models": {"a": {"model": "x", "gpus": [3]}},
                "gpus": [{"index": 0, "memory": "24GiB"}],
            },
            "asks for gpu 3, which is not declared",
        ),
        (
            {"models": {"a": {"model": "x"}}, "groups": {"g": {"members": ["zz"]}}},
            "group 'g' names unknown model 'zz'",
        ),
        ("just a string", "the top level must be a mapping"),
    ],
)
def test_bad_configs_name_file_key_and_problem(document, expected):
    problems = problems_of(document)
    assert any(expected in problem for problem in problems), problems
    assert all(problem.startswith("conf.yaml: ") for problem in problems)


def test_check_command_prints_plan_and_rejects_bad_files(tmp_path: Path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(
        "vllm:\n  executable: [/bin/true, serve]\n"
        "models:\n"
        "  coder:\n"
        "    engine: vllm\n"
        "    model: /srv/qwen\n"
        "    route: /coder\n"
        "    aliases: [coder-fast]\n"
        "    args: [--enforce-eager]\n"
    )
    assert main(["check", "-c", str(good)]) == 0
    out = capsys.readouterr().out
    assert "coder" in out
    assert "/coder" in out
    assert "--served-model-name" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  coder:\n    engine: vllm\n    model: x\n    args: [--port, '9']\n")
    assert main(["check", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: models.coder.args.0: --port is set by the gateway" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    assert main(["check", "-c", str(broken)]) == 1
    assert str(broken) in capsys.readouterr().err


def test_load_config_reports_unreadable_file(tmp_path: Path):
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "missing.yaml")
    assert "cannot read" in error.value.problems[0]
