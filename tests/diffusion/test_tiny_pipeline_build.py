"""The tiny random pipeline builder: idempotent, atomic, and the same bytes every build."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.diffusion.support import build_tiny_pipeline

pytestmark = pytest.mark.diffusion


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_a_finished_build_is_kept_and_small(tiny_pipeline: Path, diffusion_python: Path) -> None:
    before = {path: path.stat().st_mtime_ns for path in tiny_pipeline.rglob("*")}
    build_tiny_pipeline(diffusion_python, tiny_pipeline)
    assert {path: path.stat().st_mtime_ns for path in tiny_pipeline.rglob("*")} == before
    assert (tiny_pipeline / ".modelyard-complete").is_file()
    assert (tiny_pipeline / "model_index.json").is_file()
    size = sum(path.stat().st_size for path in tiny_pipeline.rglob("*") if path.is_file())
    assert size < 8 * 2**20


@pytest.mark.slow
def test_every_build_is_the_same(
    tiny_pipeline: Path, diffusion_python: Path, tmp_path: Path
) -> None:
    again = build_tiny_pipeline(diffusion_python, tmp_path / "tiny-diffusion")
    assert digests(again) == digests(tiny_pipeline)
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
