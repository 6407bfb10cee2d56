"""The demo's home folder and the paths under it."""

from __future__ import annotations

from pathlib import Path

from modelyard.demo.home import (
    CHAT_MODEL,
    CODER_MODEL,
    DEMO_ADAPTERS,
    DemoHome,
    modelyard_home,
)
from modelyard.engine_programs import build_models


def test_default_home_is_the_user_cache(monkeypatch):
    monkeypatch.setenv("HOME", "/home/ann")
    assert modelyard_home({}) == Path("/home/ann/.cache/modelyard")


def test_modelyard_home_overrides_and_is_made_absolute(tmp_path, monkeypatch):
    assert modelyard_home({"MODELYARD_HOME": str(tmp_path / "yard")}) == tmp_path / "yard"
    monkeypatch.chdir(tmp_path)
    assert modelyard_home({"MODELYARD_HOME": "rel/yard"}) == tmp_path / "rel" / "yard"
    monkeypatch.setenv("HOME", "/home/bo")
    assert modelyard_home({"MODELYARD_HOME": "~/y"}) == Path("/home/bo/y")


def test_empty_modelyard_home_means_the_default(monkeypatch):
    monkeypatch.setenv("HOME", "/h")
    assert modelyard_home({"MODELYARD_HOME": ""}) == Path("/h/.cache/modelyard")


def test_paths_under_the_home():
    home = DemoHome(Path("/yard"))
    assert home.engine_venv == Path("/yard/engine-venv")
    assert home.engine_python == Path("/yard/engine-venv/bin/python")
    assert home.vllm_launcher == Path("/yard/engine-venv/bin/modelyard-vllm")
    assert home.engine_stamp.parent == home.engine_venv
    assert home.models == Path("/yard/models")
    assert home.adapters == Path("/yard/adapters")
    assert home.chat_model == Path("/yard/models/smollm2-135m-instruct")
    assert home.coder_model == Path("/yard/models/gemma3-270m")
    assert home.adapter("sql-adapter") == Path("/yard/adapters/sql-adapter")
    assert DemoHome.from_env({"MODELYARD_HOME": "/other"}).root == Path("/other")


def test_the_builder_script_uses_the_same_folder_names():
    # build_models.py runs in the engine venv and cannot import home.py: keep them in step.
    assert build_models.CHAT_MODEL == CHAT_MODEL
    assert build_models.CODER_MODEL == CODER_MODEL
    assert build_models.DEMO_ADAPTERS == DEMO_ADAPTERS
    assert build_models.MODEL_RECIPES["chat"].folder == CHAT_MODEL
    assert build_models.MODEL_RECIPES["coder"].folder == CODER_MODEL
