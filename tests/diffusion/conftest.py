"""Fixtures: the tiny pipeline (built once into the demo home) and a running image server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelyard.demo.home import DemoHome
from tests.diffusion.support import (
    TINY_PIPELINE_DIR,
    ImageServer,
    build_tiny_pipeline,
    engine_python,
    start_image_server,
)

# One torch thread: these machines have 2 cores shared with other work, and an oversubscribed
# torch thread pool makes a 0.1 s image take several seconds.
SERVER_FLAGS = ("--threads", "1", "--max-steps", "30", "--max-images", "3", "--max-side", "512")


@pytest.fixture(scope="session")
def diffusion_python() -> Path:
    return engine_python()


@pytest.fixture(scope="session")
def tiny_pipeline(diffusion_python: Path) -> Path:
    """The tiny random pipeline, built once per home and reused (the demo serves the same one)."""
    return build_tiny_pipeline(diffusion_python, DemoHome.from_env().models / TINY_PIPELINE_DIR)


@pytest.fixture(scope="module")
def image_server(
    diffusion_python: Path, tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ImageServer]:
    """One server for a module's tests; `--max-queue 1` so the queue bound is cheap to reach."""
    log = tmp_path_factory.mktemp("image-server") / "server.log"
    server = start_image_server(
        diffusion_python, tiny_pipeline, log, *SERVER_FLAGS, "--max-queue", "1"
    )
    yield server
    server.stop()
