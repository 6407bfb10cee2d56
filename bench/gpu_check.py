"""What only a real NVIDIA GPU shows, in one command (under 8 minutes).

    pip install -e '.[nvml]'          # the gateway, with nvidia-ml-py; PyTorch already there
    python bench/gpu_check.py [--out gpu-check.json] [--skip-diffusion]

For a machine with a real GPU, PyTorch and nvidia-ml-py, and no vLLM. Everything else in the
test suite runs on a simulated GPU (tests/fake_gpu.py); this checks the same paths against
real CUDA memory, through a real `modelyard serve` and NVML (the gateway reads GPU 0 through
NVML, no declared inventory):

1. attribution: a test engine allocates a known number of bytes with CUDA; the footprint
   NVML attributes to its process tree (what the gateway learns) is compared with it
   (the CUDA context adds a few hundred MiB, so measured >= allocated, within 1.5 GiB);
2. concurrent cold starts: two models that fit together, requested at the same moment, are
   both served, one start at a time on the GPU (issue 11), with no out-of-memory error;
3. packing and eviction: a third model that does not fit beside them is served after an
   eviction; NVML is sampled every 50 ms throughout, and the peak never exceeds the card;
4. the diffusion engine in fp16 on CUDA with the tiny random pipeline (built here with
   modelyard/engine_programs/build_tiny_diffusion.py; needs diffusers), one image generated.

The test engine is this file too (`python bench/gpu_check.py engine --bytes N ...`): stdlib
HTTP plus torch, speaking the parts of vLLM's API the gateway needs. Results are printed and
written as JSON; the exit code is 0 when every check passed, 1 when one failed, 2 when the
machine cannot run the checks (no GPU, no torch, no NVML).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ROOT / "src" / "modelyard" / "engine_programs"
GIB = 1024**3
MIB = 1024**2
TOTAL_BUDGET_S = 7 * 60.0  # under the 8 minutes promised, with room to stop everything
CONTEXT_ALLOWANCE = int(1.5 * GIB)  # what a CUDA context and allocator may add


# ----- the test engine (runs in its own process; needs only torch) -----


def run_engine(options: argparse.Namespace) -> int:
    """Allocate `--bytes` of CUDA memory, then answer like a (very small) vLLM."""
    import torch

    time.sleep(options.ready_delay / 2)
    block = torch.empty(options.bytes, dtype=torch.uint8, device="cuda")
    block.fill_(1)  # touch it: the memory is really in use
    torch.cuda.synchronize()
    time.sleep(options.ready_delay / 2)
    name = options.served_name

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            time.sleep(float(body.get("fake_delay", 0)))
            self._send(
                200,
                {
                    "object": "chat.completion",
                    "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    "allocated_bytes": int(block.numel()),
                },
            )

    server = ThreadingHTTPServer(("127.0.0.1", options.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    return 0


# ----- the checks -----


@dataclass
class Check:
    name: str
    passed: bool = False
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


@dataclass
class Report:
    gpu: dict[str, Any]
    checks: list[Check]
    peak_used_bytes: int = 0

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


class MemorySampler:
    """NVML's used memory on GPU 0 every 50 ms, in a thread: the peak is what matters."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(0)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self.peak = max(self.peak, used)
            self._stop.wait(0.05)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def preflight() -> tuple[Any, dict[str, Any]] | str:
    """NVML and torch with CUDA, or the reason they are not there."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False: no NVIDIA GPU or driver here"
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
    except Exception as error:  # NVMLError and friends
        return f"NVML does not answer: {error}"
    if isinstance(name, bytes):
        name = name.decode()
    return pynvml, {
        "name": name,
        "total_bytes": int(memory.total),
        "used_bytes_before": int(memory.used),
        "count": int(pynvml.nvmlDeviceGetCount()),
        "torch": torch.__version__,
    }


def plan_sizes(free: int, max_gib: float) -> tuple[int, int]:
    """The test engines' size and the room to leave free for them.

    Before measuring, the gateway plans each engine at its hint (size + CONTEXT_ALLOWANCE);
    afterwards at what NVML measured (size + the CUDA context, about 0.5 GiB). With room
    2.5 x size + 3 GiB, two hints fit, and a third hint does not fit beside two measured
    engines (for sizes above 1.4 GiB), so the third start must evict.
    """
    size = int(min((free - 3 * GIB) / 2.5, max_gib * GIB)) // MIB * MIB
    if size < 2 * GIB:
        raise RuntimeError(f"the GPU has {free / GIB:.1f} GiB free; the check needs about 8")
    return size, int(2.5 * size + 3 * GIB)


def hold_ballast(size: int) -> object | None:
    """Allocate `size` bytes of CUDA memory in this process (kept while the result lives)."""
    if size < 256 * MIB:
        return None
    import torch

    block = torch.empty(size, dtype=torch.uint8, device="cuda")
    block.fill_(0)
    torch.cuda.synchronize()
    return block


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engine_model(name: str, size: int, ready_delay: float) -> dict[str, Any]:
    return {
        "engine": "command",
        "command": [
            sys.executable,
            str(Path(__file__).resolve()),
            "engine",
            "--port",
            "{port}",
            "--served-name",
            name,
            "--bytes",
            str(size),
            "--ready-delay",
            str(ready_delay),
        ],
        "served_name": name,
        "memory": size + CONTEXT_ALLOWANCE,  # the hint until NVML has measured it
        "gpus": [0],
        "start_timeout": "120s",
    }


@contextlib.contextmanager
def gateway(directory: Path, models: dict[str, Any], **settings: Any) -> Iterator[str]:
    """`modelyard serve` (NVML inventory) on a free port; stopped, engines and all, after."""
    import yaml

    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(directory / "state"),
        "models": models,
        **settings,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "modelyard.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (directory / "gateway.out").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "serve", "-c", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in (directory / "gateway.out").read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "gateway did not start:\n" + (directory / "gateway.out").read_text()
                )
            time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def post(url: str, path: str, body: dict[str, Any], timeout: float = 180) -> tuple[int, Any]:
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=30) as response:
        return json.loads(response.read())


def chat(url: str, model: str) -> tuple[int, Any]:
    return post(
        url,
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )


def events(url: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = get(url, "/admin/events?follow=0&recent=500")["events"]
    return result


def timed(check: Check, run: Callable[[Check], None]) -> Check:
    began = time.monotonic()
    try:
        run(check)
    except Exception as error:
        check.passed, check.problem = False, f"{type(error).__name__}: {error}"
    check.seconds = round(time.monotonic() - began, 1)
    return check


def run_checks(options: argparse.Namespace) -> Report | str:
    found = preflight()
    if isinstance(found, str):
        return found
    nvml, gpu = found
    free = gpu["total_bytes"] - gpu["used_bytes_before"]
    size, room = plan_sizes(free, options.max_gib)
    gpu["model_bytes"], gpu["room_bytes"] = size, room
    # On a card larger than the test needs, this process holds the rest ("another program's
    # memory", which the gateway must plan around), so that two engines fit and three do not.
    ballast = hold_ballast(free - room)
    gpu["ballast_bytes"] = free - room if ballast is not None else 0
    work = Path(tempfile.mkdtemp(prefix="modelyard-gpu-check-"))
    checks: list[Check] = []
    with MemorySampler(nvml) as sampler:
        models = {name: engine_model(name, size, options.ready_delay) for name in ("a", "b", "c")}
        with gateway(work / "gateway", models) as url:
            checks.append(timed(Check("concurrent cold starts"), lambda c: concurrent(c, url)))
            checks.append(timed(Check("attribution"), lambda c: attribution(c, url, size)))
            checks.append(
                timed(
                    Check("packing and eviction"),
                    lambda c: eviction(c, url, sampler, gpu["total_bytes"]),
                )
            )
        if not options.skip_diffusion:
            checks.append(timed(Check("diffusion fp16 on CUDA"), lambda c: diffusion(c, work)))
    return Report(gpu, checks, sampler.peak)


def concurrent(check: Check, url: str) -> None:
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda m: chat(url, m), ["a", "b"]))
    statuses = [status for status, _ in answers]
    kinds = [(e["kind"], e["model"]) for e in events(url) if e["model"] in ("a", "b")]
    starts = [i for i, (k, _) in enumerate(kinds) if k == "start"]
    readies = [i for i, (k, _) in enumerate(kinds) if k == "ready"]
    check.figures = {"statuses": statuses, "events": kinds}
    one_at_a_time = len(starts) == 2 and len(readies) >= 1 and readies[0] < starts[1]
    check.passed = statuses == [200, 200] and one_at_a_time
    if not check.passed:
        check.problem = "both must be served, the second started after the first was ready"


def attribution(check: Check, url: str, size: int) -> None:
    status = get(url, "/gateway/status")
    model = next(m for m in status["models"] if m["name"] == "a")
    measured = model.get("footprint_bytes")
    check.figures = {
        "allocated_bytes": size,
        "measured_bytes": measured,
        "measured": model.get("footprint_measured"),
        "overhead_mib": None if measured is None else round((measured - size) / MIB),
    }
    check.passed = bool(
        model.get("footprint_measured")
        and measured is not None
        and size <= measured <= size + CONTEXT_ALLOWANCE
    )
    if not check.passed:
        check.problem = "NVML's footprint should be the allocation plus the CUDA context"


def eviction(check: Check, url: str, sampler: MemorySampler, total: int) -> None:
    status, _ = chat(url, "c")
    evictions = [e for e in events(url) if e["kind"] == "evict"]
    log_problems = [e for e in events(url) if e["kind"] in ("start_failed", "oom_retry")]
    check.figures = {
        "status": status,
        "evicted": [e["model"] for e in evictions],
        "peak_used_bytes": sampler.peak,
        "total_bytes": total,
        "failed_starts": len(log_problems),
    }
    check.passed = status == 200 and bool(evictions) and sampler.peak <= total and not log_problems
    if not check.passed:
        check.problem = "c must be served after an eviction, within the card, with no OOM"


def diffusion(check: Check, work: Path) -> None:
    pipeline = work / "tiny-diffusion"
    built = subprocess.run(
        [sys.executable, str(PROGRAMS / "build_tiny_diffusion.py"), str(pipeline)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0:
        raise RuntimeError(f"building the tiny pipeline failed: {built.stderr[-2000:]}")
    model = {
        "engine": "diffusion",
        "model": str(pipeline),
        "args": ["--device", "cuda", "--dtype", "float16", "--max-side", "256"],
        "env": {"HF_HUB_OFFLINE": "1"},
        "start_timeout": "180s",
    }
    with gateway(
        work / "diffusion", {"vision": model}, diffusion={"executable": [sys.executable]}
    ) as url:
        status, body = post(
            url,
            "/v1/images/generations",
            {"model": "vision", "prompt": "a red square", "size": "64x64", "n": 1},
        )
        placement = next(m for m in get(url, "/gateway/status")["models"])
    images = body.get("data", []) if isinstance(body, dict) else []
    check.figures = {
        "status": status,
        "images": len(images),
        "footprint_bytes": placement.get("footprint_bytes"),
    }
    check.passed = status == 200 and len(images) == 1
    if not check.passed:
        check.problem = f"image generation answered {status}: {str(body)[:500]}"


# ----- command line -----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command")
    engine = sub.add_parser("engine", help="the test engine (started by the gateway)")
    engine.add_argument("--port", type=int, required=True)
    engine.add_argument("--served-name", required=True)
    engine.add_argument("--bytes", type=int, required=True, help="CUDA memory to allocate")
    engine.add_argument("--ready-delay", type=float, default=3.0)
    engine.add_argument("--root", default=None, help="ignored (a marker for leak checks)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--skip-diffusion", action="store_true")
    parser.add_argument("--max-gib", type=float, default=8.0, help="largest test engine")
    parser.add_argument(
        "--ready-delay", type=float, default=5.0, help="seconds each test engine takes to start"
    )
    options = parser.parse_args(argv)
    if options.command == "engine" and options.bytes <= 0:
        parser.error("--bytes must be positive")
    return options


def _out_of_time(signum: int, frame: object) -> None:
    raise TimeoutError(f"the GPU check ran out of its {TOTAL_BUDGET_S:.0f} s")


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.command == "engine":
        return run_engine(options)
    # Never more than the promised time; cleanup still runs. The alarm is process-wide, so it
    # is disarmed (and the old handler put back) however the checks end: a caller such as a
    # test that runs main() in-process must not be interrupted minutes later.
    previous = signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(int(TOTAL_BUDGET_S))
    try:
        result = run_checks(options)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if isinstance(result, str):
        print(f"gpu_check: cannot run here: {result}", file=sys.stderr)
        return 2
    document = {"passed": result.passed, **asdict(result)}
    options.out.write_text(json.dumps(document, indent=1))
    for check in result.checks:
        mark = "PASS" if check.passed else "FAIL"
        print(f"{mark} {check.name} ({check.seconds} s): {json.dumps(check.figures)}")
        if check.problem:
            print(f"     {check.problem}")
    print(
        f"peak GPU memory used: {result.peak_used_bytes / GIB:.2f} GiB of "
        f"{result.gpu['total_bytes'] / GIB:.2f} GiB; report: {options.out}"
    )
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
