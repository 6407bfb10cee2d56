"""The CLI against a real `modelyard serve --port`: what `reload` and `keys create` print, and
where state goes when the config names no `state_dir`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from modelyard.checking.checks import config_warnings
from modelyard.config import parse_config
from modelyard.config.state_home import platform_state_dir
from tests.conftest import fake_model, free_port
from tests.security.keys import ADMIN_KEY, key_config


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=cwd, check=False,
    )  # fmt: skip


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A gateway started from a folder with `serve --port` (the file's listen differs) and no
    state_dir in its config; XDG_STATE_HOME points into the test's folder."""
    config = {
        "listen": "127.0.0.1:8000",
        "auth": {"keys": [key_config("ops", ADMIN_KEY, admin=True)]},
        "models": {"chat": fake_model("chat")},
    }
    path = tmp_path / "modelyard.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg"), "PYTHONUNBUFFERED": "1"}
    env.pop("MODELYARD_URL", None)
    out = (tmp_path / "gateway.out").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "serve", "-c", str(path), "--port", str(port)],
        stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while "modelyard listening on http" not in (tmp_path / "gateway.out").read_text():
        log = (tmp_path / "gateway.out").read_text()
        assert process.poll() is None, log
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
    env = {**env, "MODELYARD_URL": f"http://127.0.0.1:{port}", "MODELYARD_API_KEY": ADMIN_KEY}
    try:
        yield f"http://127.0.0.1:{port}", tmp_path, env
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_reload_after_serve_port_names_models_and_reports_nothing_unapplied(served) -> None:
    _url, folder, env = served
    unchanged = cli("reload", env=env, cwd=folder)
    assert unchanged.returncode == 0, unchanged.stderr
    assert "not applied" not in unchanged.stdout  # --port is not a change of the file's listen
    config = yaml.safe_load((folder / "modelyard.yaml").read_text())
    config["models"]["coder"] = fake_model("coder")
    (folder / "modelyard.yaml").write_text(yaml.safe_dump(config))
    added = cli("reload", env=env, cwd=folder)
    assert "model_added: coder: " in added.stdout, added.stdout
    assert "not applied" not in added.stdout


def test_keys_create_uses_modelyard_url(served) -> None:
    url, folder, env = served
    made = cli("keys", "create", "alice", "--models", "chat", env=env, cwd=folder)
    assert made.returncode == 0, made.stderr
    assert f"Active now on {url}" in made.stdout, made.stdout
    listed = cli("keys", "list", env=env, cwd=folder)
    assert "alice" in listed.stdout
    entry = cli("keys", "create", "bob", "--config-entry", env=env, cwd=folder)
    assert "sha256:" in entry.stdout
    assert "Active now" not in entry.stdout


def test_state_goes_to_the_platform_state_folder(served) -> None:
    _url, folder, _env = served
    assert (folder / "xdg" / "modelyard" / "events.sqlite3").exists()
    assert not (folder / ".state").exists()


def test_a_state_folder_left_in_the_current_directory_is_used_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    config = parse_config({"models": {}}, "my.yaml", {})
    assert Path(config.state_dir) == platform_state_dir() == tmp_path / "xdg" / "modelyard"
    assert config_warnings("my.yaml", config) == []
    (tmp_path / ".state" / "logs").mkdir(parents=True)
    old = parse_config({"models": {}}, "my.yaml", {})
    assert old.state_dir == ".state"
    (warning,) = config_warnings("my.yaml", old)
    assert str(tmp_path / ".state") in warning
    assert "state_dir" in warning
    chosen = parse_config({"state_dir": ".state", "models": {}}, "my.yaml", {})
    assert config_warnings("my.yaml", chosen) == []  # written out: the user's choice
    monkeypatch.delenv("XDG_STATE_HOME")
    (tmp_path / ".state" / "logs").rmdir()
    assert parse_config({"models": {}}, "my.yaml", {}).state_dir == str(
        Path.home() / ".local" / "state" / "modelyard"
    )
