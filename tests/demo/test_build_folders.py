"""Model and adapter folders: built in a temporary folder, renamed into place when complete.

`build_models.py` runs in the engine venv, but its folder logic is stdlib only, so the gateway's
Python tests it here with builders that write small files instead of weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelyard.engine_programs import build_models
from modelyard.engine_programs.build_models import (
    MARKER,
    AdapterSpec,
    adapter_specs,
    build_atomically,
    is_complete,
    numbered_names,
    parse_rank_for,
    parser,
)


def write_weights(folder: Path) -> None:
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 64)


def test_a_build_lands_complete_and_is_then_skipped(tmp_path):
    target = tmp_path / "models" / "m"
    calls: list[Path] = []

    def build(folder: Path) -> None:
        calls.append(folder)
        write_weights(folder)

    assert build_atomically(target, "m:v1", build) is True
    assert is_complete(target, "m:v1")
    assert (target / "model.safetensors").read_bytes() == b"w" * 64
    assert json.loads((target / MARKER).read_text())["recipe"] == "m:v1"
    assert calls[0] != target  # built elsewhere, then renamed
    assert build_atomically(target, "m:v1", build) is False
    assert len(calls) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]


def test_a_failed_build_leaves_nothing_that_looks_finished_and_is_redone(tmp_path):
    target = tmp_path / "m"

    def broken(folder: Path) -> None:
        write_weights(folder)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_atomically(target, "m:v1", broken)
    assert not target.exists()
    assert not is_complete(target, "m:v1")
    assert not list(tmp_path.glob(".m.partial-*"))
    assert build_atomically(target, "m:v1", write_weights) is True
    assert is_complete(target, "m:v1")


def test_a_killed_build_is_redone(tmp_path):
    """A builder process killed with SIGKILL mid-build leaves a partial folder; the next run
    removes it and builds again."""
    target = tmp_path / "m"
    started = tmp_path / "started"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from modelyard.engine_programs.build_models import build_atomically\n"
        "def build(folder):\n"
        "    (folder / 'half.bin').write_bytes(b'x')\n"
        f"    Path({str(started)!r}).touch()\n"
        "    time.sleep(60)\n"
        f"build_atomically(Path({str(target)!r}), 'm:v1', build)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert process.poll() is None, "the builder exited early"
            assert time.monotonic() < deadline, "the builder never started"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not is_complete(target, "m:v1")
    assert list(tmp_path.glob(".m.partial-*"))  # what the killed build left behind
    assert build_atomically(target, "m:v1", write_weights) is True
    assert is_complete(target, "m:v1")
    assert not (target / "half.bin").exists()
    assert not list(tmp_path.glob(".m.partial-*"))


def test_a_target_without_marker_or_with_another_recipe_is_rebuilt(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")  # e.g. copied by hand, or an older layout
    assert not is_complete(target, "m:v1")
    assert build_atomically(target, "m:v1", write_weights) is True
    assert not (target / "stale.bin").exists()
    assert build_atomically(target, "m:v2", write_weights) is True  # the recipe changed
    assert is_complete(target, "m:v2")
    assert not is_complete(target, "m:v1")


def test_a_damaged_marker_does_not_count(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / MARKER).write_text("{not json")
    assert not is_complete(target, "m:v1")
    (target / MARKER).write_text('["m:v1"]')
    assert not is_complete(target, "m:v1")


def test_adapter_seeds_depend_on_the_name_only():
    first, second = AdapterSpec("sql-adapter"), AdapterSpec("email-adapter")
    assert first.effective_seed == AdapterSpec("sql-adapter", rank=16).effective_seed
    assert first.effective_seed != second.effective_seed
    assert AdapterSpec("x", seed=7).effective_seed == 7
    base = Path("/m/smollm2-135m-instruct")
    assert first.recipe(base) != AdapterSpec("sql-adapter", rank=16).recipe(base)
    assert first.recipe(base) != first.recipe(Path("/m/gemma3-270m"))


def test_adapter_specs_for_many_adapters_with_one_of_another_rank():
    names = numbered_names(20, "lora-")
    assert names[0] == "lora-01"
    assert names[-1] == "lora-20"
    assert len(set(names)) == 20
    specs = adapter_specs(names, 8, parse_rank_for(["lora-07=16"]))
    assert [spec.rank for spec in specs].count(16) == 1
    assert specs[6].rank == 16
    assert specs[0].target_modules == ("q_proj", "v_proj")
    with pytest.raises(SystemExit, match="unknown adapters"):
        adapter_specs(names, 8, {"nope": 16})
    with pytest.raises(SystemExit, match="NAME=RANK"):
        parse_rank_for(["lora-07"])


def test_command_line():
    args = parser().parse_args(
        ["adapters", "--base", "/m/b", "--out", "/a", "--count", "20", "--rank-for", "lora-03=16"]
    )
    assert (args.count, args.rank, args.rank_for, args.prefix) == (20, 8, ["lora-03=16"], "lora-")
    args = parser().parse_args(
        ["adapters", "--base", "b", "--out", "o", "--name", "a", "--name", "b"]
    )
    assert args.name == ["a", "b"]
    with pytest.raises(SystemExit):
        parser().parse_args(["adapters", "--base", "b", "--out", "o"])  # no names
    args = parser().parse_args(["all", "--models-dir", "/m", "--adapters-dir", "/a"])
    assert args.models_dir == Path("/m")


def test_the_script_does_not_import_torch_until_it_builds():
    # The gateway's tests import it; torch is only in the engine venv.
    code = "import sys, modelyard.engine_programs.build_models; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
    assert "ENGINE venv" in (build_models.__doc__ or "")


def test_adapters_need_a_built_base(tmp_path):
    with pytest.raises(SystemExit, match="build it first"):
        build_models.build_adapters(tmp_path / "missing", tmp_path / "out", [AdapterSpec("a")])
