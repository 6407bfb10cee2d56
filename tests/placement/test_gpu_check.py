"""bench/gpu_check.py's parts that run without a GPU: imports, arguments, sizing, refusal.

The checks themselves need a real NVIDIA GPU (none here); this keeps the command ready: it
imports without torch, parses its arguments, plans sizes that make the third engine evict,
and says clearly why it cannot run on a machine without a GPU.
"""

from __future__ import annotations

import pytest
from bench import gpu_check

GIB = 1024**3


def test_the_engine_subcommand_parses_its_arguments() -> None:
    options = gpu_check.parse_args(
        ["engine", "--port", "8001", "--served-name", "a", "--bytes", str(GIB)]
    )
    assert (options.command, options.port, options.served_name, options.bytes) == (
        "engine",
        8001,
        "a",
        GIB,
    )
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["engine", "--port", "1", "--served-name", "a", "--bytes", "-5"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["engine", "--port", "not-a-port"])


def test_the_check_options_have_defaults() -> None:
    options = gpu_check.parse_args([])
    assert options.command is None
    assert not options.skip_diffusion
    assert options.max_gib == 8.0


@pytest.mark.parametrize("free_gib", [15, 23, 79, 139])
def test_sizes_make_two_engines_fit_and_the_third_evict(free_gib: int) -> None:
    size, room = gpu_check.plan_sizes(free_gib * GIB, max_gib=8.0)
    hint = size + gpu_check.CONTEXT_ALLOWANCE
    measured = size + GIB // 2  # the CUDA context, roughly
    assert room <= free_gib * GIB
    assert 2 * hint <= room  # a and b, planned at their hints, fit together
    assert 2 * measured + hint > room  # c does not fit beside them: an eviction


def test_a_machine_without_a_gpu_is_told_why_and_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    assert gpu_check.main(["--out", str(tmp_path / "r.json")]) == 2
    assert "cannot run here" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
