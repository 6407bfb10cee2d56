"""Helpers for the diffusion tests: the engine venv, the tiny pipeline, a real server process.

The gateway's venv has no torch, diffusers or PIL, so everything that needs them runs in the
engine venv's Python as a separate process, and PNGs are checked here with the stdlib.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelyard.demo.home import DemoHome
from modelyard.engines.diffusion import SERVER_SCRIPT
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
BUILDER = REPO / "src" / "modelyard" / "engine_programs" / "build_tiny_diffusion.py"
TINY_PIPELINE_DIR = "tiny-diffusion"
"""Folder name of the tiny pipeline under `$MODELYARD_HOME/models` (the demo serves it too)."""

ENGINE_MODULES = ("torch", "diffusers", "transformers", "aiohttp", "PIL")


def engine_python() -> Path:
    """The engine venv's Python, with what the diffusion server needs; fails loudly if absent.

    The one place that finds the engine venv, so it can later go through the shared setup.
    """
    home = DemoHome.from_env()
    python = home.engine_python
    if not python.exists():
        pytest.fail(
            f"no engine venv at {home.engine_venv}: the diffusion tests need it (torch, diffusers)."
            " Run the demo setup (modelyard.demo.engine_env.ensure_engine_env, e.g. `make demo`)"
            " or point MODELYARD_HOME at a home that has one.",
            pytrace=False,
        )
    probe = "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, sys.argv[1:])))"
    if subprocess.run([str(python), "-c", probe, *ENGINE_MODULES], check=False).returncode:
        pytest.fail(
            f"the engine venv {home.engine_venv} lacks one of {', '.join(ENGINE_MODULES)}:"
            " rerun the demo setup (it installs diffusers into the engine venv).",
            pytrace=False,
        )
    return python


def build_tiny_pipeline(python: Path, folder: Path) -> Path:
    """Build the tiny random pipeline into `folder` (a no-op when a finished build is there)."""
    result = subprocess.run(
        [str(python), str(BUILDER), str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode:
        pytest.fail(f"building the tiny pipeline failed:\n{result.stderr[-3000:]}", pytrace=False)
    return folder


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an 8-bit RGB PNG, after checking its chunks, CRCs and pixel data."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    offset, chunks = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1][0] == b"IEND"
    width, height, depth, color = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (depth, color) == (8, 2), "expected 8-bit RGB"
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + width * 3), "pixel data does not match the header"
    return width, height


@dataclass
class Answer:
    """An HTTP answer: status, headers and the JSON body."""

    status: int
    headers: dict[str, str]
    body: Any


@dataclass
class ImageServer:
    """A diffusion_server.py process on a free port."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def request(self, method: str, path: str, body: bytes | None = None) -> Answer:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return Answer(response.status, dict(response.headers), json.loads(response.read()))
        except urllib.error.HTTPError as error:
            return Answer(error.code, dict(error.headers), json.loads(error.read()))

    def post(self, path: str, payload: Any) -> Answer:
        return self.request("POST", path, json.dumps(payload).encode())

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def busy(self) -> int:
        return int(self.get("/healthz").body["busy"])

    def wait_busy(self, count: int, timeout: float = 30.0) -> None:
        """Wait until `count` requests are running or queued in the server."""
        deadline = time.monotonic() + timeout
        while self.busy() < count:
            assert time.monotonic() < deadline, f"server never had {count} requests in"
            time.sleep(0.01)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_image_server(
    python: Path, model: Path, log: Path, *extra: str, timeout: float = 180.0
) -> ImageServer:
    """Start the server the way DiffusionEngine does and wait until /health answers 200."""
    port = free_port()
    argv = [str(python), str(SERVER_SCRIPT), "--model", str(model), "--port", str(port)]
    argv += ["--host", "127.0.0.1", "--served-name", "vision", *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    server = ImageServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the image server exited early:\n{server.log_text()[-3000:]}")
        try:
            if server.get("/health").status == 200:
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    pytest.fail(f"the image server was not ready in {timeout} s:\n{server.log_text()[-3000:]}")
