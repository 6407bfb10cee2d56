"""The demo: real vLLM engines on CPU with two tiny models and two LoRA adapters.

`prepare_demo()` makes everything `examples/demo.yaml` needs, under `$MODELYARD_HOME`
(default `~/.cache/modelyard`):

1. the engine venv with vLLM for CPU (`engine_env.ensure_engine_env`, about 3 minutes once);
2. the model folders and LoRA adapters (`build_models.py`, run with the engine venv's Python
   because it imports torch, transformers and peft, which the gateway never imports; about
   2 minutes once).

Both steps are skipped in well under a second when their results are already there. The returned
`DemoSetup.environ` holds the variables the config reads (`MODELYARD_HOME`, `MODELYARD_VLLM`):
pass it to `load_config(..., environ=...)` or add it to the gateway's environment.

Stdlib only: this runs in the gateway's Python.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelyard.demo.engine_env import (
    VLLM_ENV,
    EngineEnv,
    EngineEnvError,
    Progress,
    check_build_python,
    ensure_engine_env,
    find_external_vllm,
    print_progress,
)
from modelyard.demo.home import DEMO_ADAPTERS, HOME_ENV, DemoHome, modelyard_home
from modelyard.engine_programs import program_path

BUILD_SCRIPT = program_path("build_models.py")
"""Run with the engine venv's Python: builds model folders and LoRA adapters."""


@dataclass(frozen=True)
class DemoSetup:
    """What `prepare_demo()` made, and the environment the demo config needs."""

    home: DemoHome
    engine: EngineEnv
    chat_model: Path
    coder_model: Path
    adapters: dict[str, Path] = field(default_factory=dict)

    @property
    def environ(self) -> dict[str, str]:
        """`MODELYARD_HOME`, `MODELYARD_VLLM` and `MODELYARD_ENGINE_PYTHON`, as
        `examples/demo.yaml` reads them."""
        return {
            HOME_ENV: str(self.home.root),
            VLLM_ENV: self.engine.vllm_executable,
            ENGINE_PYTHON_ENV: str(self.engine.build_python),
        }


ENGINE_PYTHON_ENV = "MODELYARD_ENGINE_PYTHON"
DIFFUSION_BUILD_SCRIPT = program_path("build_tiny_diffusion.py")


def demo_config_path() -> Path:
    """`examples/demo.yaml` of this source checkout."""
    return Path(__file__).resolve().parents[3] / "examples" / "demo.yaml"


def vllm_argv(home: DemoHome | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The argv that starts vLLM's CLI with `serve`, for a config's `vllm: executable:`.

    `$MODELYARD_VLLM` or a `vllm` on PATH when there is one, else the engine venv's launcher
    (which `ensure_engine_env()` installs; this function installs nothing).
    """
    env = os.environ if environ is None else environ
    home = DemoHome.from_env(env) if home is None else home
    external = find_external_vllm(home, env)
    if external is not None:
        return [str(external), "serve"]
    return [str(home.vllm_launcher), "serve"]


def run_model_builder(
    engine: EngineEnv, home: DemoHome, environ: Mapping[str, str], progress: Progress
) -> None:
    """Run `build_models.py all` with the engine's Python (it skips what is already built)."""
    if engine.venv is None:
        check_build_python(engine.build_python)
    env = {**environ, "HF_HUB_OFFLINE": "1"}
    argv = [
        str(engine.build_python),
        str(BUILD_SCRIPT),
        "all",
        "--models-dir",
        str(home.models),
        "--adapters-dir",
        str(home.adapters),
    ]
    result = subprocess.run(argv, env=env, check=False)
    if result.returncode != 0:
        raise EngineEnvError(
            f"building the demo's models failed (exit {result.returncode}): {' '.join(argv)}"
        )
    progress(f"models in {home.models}, adapters in {home.adapters}")
    diffusion = [str(engine.build_python), str(DIFFUSION_BUILD_SCRIPT), str(home.diffusion_model)]
    if subprocess.run(diffusion, env=env, check=False).returncode != 0:
        raise EngineEnvError(
            f"building the demo's tiny diffusion pipeline failed: {' '.join(diffusion)}"
        )


def write_adapters(
    out_dir: Path,
    names: Sequence[str] = (),
    *,
    count: int = 0,
    prefix: str = "lora-",
    rank: int = 8,
    rank_for: Mapping[str, int] | None = None,
    base: Path | None = None,
    setup: DemoSetup | None = None,
) -> list[Path]:
    """Write LoRA adapters (random, reproducible weights) into `out_dir`, for tests.

    Either `names` or `count` adapters named `PREFIX01`...; all of `rank` except those in
    `rank_for`. `base` defaults to the demo's SmolLM2 (pass `setup.coder_model` for an adapter
    built for a different base). Runs `build_models.py adapters` with the engine's Python;
    finished adapters are skipped.
    """
    setup = prepare_demo(progress=lambda _: None) if setup is None else setup
    argv = [
        str(setup.engine.build_python),
        str(BUILD_SCRIPT),
        "adapters",
        "--base",
        str(base or setup.chat_model),
        "--out",
        str(out_dir),
        "--prefix",
        prefix,
        "--rank",
        str(rank),
    ]
    argv += [f"--name={name}" for name in names] if names else ["--count", str(count)]
    argv += [f"--rank-for={name}={value}" for name, value in (rank_for or {}).items()]
    result = subprocess.run(argv, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    if result.returncode != 0:
        raise EngineEnvError(f"writing adapters failed (exit {result.returncode})")
    listed = names or [
        f"{prefix}{index:0{max(2, len(str(count)))}d}" for index in range(1, count + 1)
    ]
    return [Path(out_dir) / name for name in listed]


def prepare_demo(
    home: DemoHome | Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    progress: Progress = print_progress,
) -> DemoSetup:
    """Make the engine venv, the model folders and the adapters; return where they are.

    `home` defaults to `$MODELYARD_HOME` (or `~/.cache/modelyard`). Raises `EngineEnvError`
    with the failing step's log lines when something cannot be made.
    """
    env = dict(os.environ if environ is None else environ)
    if home is None:
        demo_home = DemoHome(modelyard_home(env))
    elif isinstance(home, DemoHome):
        demo_home = home
    else:
        demo_home = DemoHome(Path(home).expanduser().absolute())
    env[HOME_ENV] = str(demo_home.root)
    started = time.monotonic()
    engine = ensure_engine_env(demo_home, environ=env, progress=progress)
    run_model_builder(engine, demo_home, env, progress)
    progress(f"demo ready ({time.monotonic() - started:.1f} s)")
    return DemoSetup(
        home=demo_home,
        engine=engine,
        chat_model=demo_home.chat_model,
        coder_model=demo_home.coder_model,
        adapters={name: demo_home.adapter(name) for name in DEMO_ADAPTERS},
    )


__all__ = [
    "DemoHome",
    "DemoSetup",
    "EngineEnv",
    "EngineEnvError",
    "demo_config_path",
    "ensure_engine_env",
    "modelyard_home",
    "prepare_demo",
    "vllm_argv",
    "write_adapters",
]
