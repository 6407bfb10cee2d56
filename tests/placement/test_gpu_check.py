"""bench/gpu_check.py's parts that run without a GPU: imports, arguments, sizing, refusal.

The checks themselves need a real NVIDIA GPU (none here); this keeps the command ready: it
imports without torch, parses its arguments, plans sizes that make the third engine evict,
and says clearly why it cannot run on a machine without a GPU.
"""

from __future__ import annotations

import signal

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
    # Its time budget is a process-wide alarm: it must be disarmed once main() returns, or it
    # interrupts whatever this process runs minutes later.
    assert signal.alarm(0) == 0
    assert signal.getsignal(signal.SIGALRM) is not gpu_check._out_of_time


STUB_TORCH = """
class _Block:
    def __init__(self, size):
        self.size = size

    def fill_(self, value):
        return self

    def numel(self):
        return self.size


uint8 = "uint8"


def empty(size, dtype=None, device=None):
    assert device == "cuda"
    return _Block(size)


class cuda:
    @staticmethod
    def synchronize():
        pass
"""


def test_the_test_engine_answers_like_a_small_vllm(tmp_path) -> None:
    # Its HTTP side, with a stand-in for torch (no CUDA here): what the gateway will talk to.
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.conftest import free_port

    (tmp_path / "torch.py").write_text(STUB_TORCH)
    port = free_port()
    argv = [sys.executable, gpu_check.__file__, "engine", "--port", str(port)]
    argv += ["--served-name", "a", "--bytes", "4096", "--ready-delay", "0"]
    process = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the test engine did not come up"
                time.sleep(0.1)
        with urllib.request.urlopen(url + "/v1/models") as response:
            assert [m["id"] for m in json.loads(response.read())["data"]] == ["a"]
        request = urllib.request.Request(
            url + "/v1/chat/completions",
            json.dumps({"model": "a", "messages": []}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as response:
            assert json.loads(response.read())["allocated_bytes"] == 4096
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
